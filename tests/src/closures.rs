//! Reproducible test closures: a generator of Nix expressions whose
//! derivations form a layered DAG and exercise everything a closure copy or a
//! remote build must get right: references between outputs (by content and by
//! symlink), nested and empty directories, empty files, executables, multiple
//! outputs with a reference from one output to another, `builtins.toFile`
//! sources, build logs on stdout and stderr, and large files.
//!
//! The expression is a pure function of the [`ClosureSpec`]: the same spec
//! gives the same `.drv` paths on every host and every run. Output *contents*
//! are reproducible too, except the large files filled from `/dev/urandom`
//! ([`Fill::Random`]): those make two builds of one derivation differ, so a
//! test that compares hosts must copy the paths, not rebuild them. Change
//! [`ClosureSpec::name`] to get fresh derivations.
//!
//! Builders are `/bin/sh` (nix-interfaces.md §11) and run with
//! `PATH=/path-not-set` outside any sandbox: scripts use shell built-ins
//! (`echo`, `read`, redirections) and the absolute-path tools in
//! [`BUILDER_TOOLS`], which every Debian system has (coreutils is essential;
//! `/bin` is `/usr/bin` on merged-/usr systems).

use std::fmt::Write as _;

/// External programs the generated builders call, by absolute path.
pub const BUILDER_TOOLS: &[&str] = &[
    "/bin/mkdir",
    "/bin/ln",
    "/bin/chmod",
    "/bin/head",
    "/bin/yes",
];

/// What the large files contain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fill {
    /// Bytes from `/dev/urandom`: incompressible, different on every build.
    Random,
    /// A repeated line of text: compresses by orders of magnitude; reproducible.
    Compressible,
    /// Alternately random and compressible, node by node: about half the large
    /// bytes compress.
    Alternate,
}

/// The shape of a generated closure: `layers` × `width` nodes, each node in
/// layer *l* > 0 referencing `fan_in` nodes of layer *l − 1*, plus one `root`
/// derivation referencing every output of the last layer (so the root's
/// closure is everything). Derivation count: `layers * width + 1`.
#[derive(Debug, Clone)]
pub struct ClosureSpec {
    /// Prefix of every derivation name; different names give different paths.
    pub name: String,
    /// Depth of the DAG (at least 1).
    pub layers: usize,
    /// Nodes per layer (at least 1).
    pub width: usize,
    /// References from a node to the previous layer (clamped to `1..=width`).
    pub fan_in: usize,
    /// Every `large_every`-th node (0 = none) gets a file `blob` of `large_bytes`.
    pub large_every: usize,
    /// Size of each large file.
    pub large_bytes: u64,
    /// Content of the large files.
    pub fill: Fill,
    /// Every `multi_output_every`-th node (0 = none) has outputs `out` and
    /// `doc`, and `doc` references `out`.
    pub multi_output_every: usize,
    /// Nix attributes added verbatim to every node derivation (not the root),
    /// e.g. `requiredSystemFeatures = [ "kvm" ];` or `preferLocalBuild = true;`.
    pub extra_attrs: String,
}

impl ClosureSpec {
    /// A small closure (3 × 4 nodes + root, 13 derivations) with one 64 KiB
    /// large file in every fourth node and multiple outputs in every third.
    pub fn new(name: &str) -> Self {
        Self {
            name: name.to_owned(),
            layers: 3,
            width: 4,
            fan_in: 2,
            large_every: 4,
            large_bytes: 64 * 1024,
            fill: Fill::Alternate,
            multi_output_every: 3,
            extra_attrs: String::new(),
        }
    }

    /// Number of derivations the expression defines (root included).
    pub fn derivation_count(&self) -> usize {
        self.layers.max(1) * self.width.max(1) + 1
    }
}

/// A Nix string literal assembled from escaped text and antiquotations.
#[derive(Default)]
struct NixStr(String);

impl NixStr {
    /// Appends literal text, escaped for a double-quoted Nix string.
    fn lit(&mut self, text: &str) -> &mut Self {
        let mut chars = text.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '"' => self.0.push_str("\\\""),
                '\\' => self.0.push_str("\\\\"),
                '$' if chars.peek() == Some(&'{') => self.0.push_str("\\$"),
                c => self.0.push(c),
            }
        }
        self
    }

    /// Appends `${expr}`: the output path of a derivation (and a dependency on it).
    fn antiquote(&mut self, expr: &str) -> &mut Self {
        let _ = write!(self.0, "${{{expr}}}");
        self
    }

    fn finish(&self) -> String {
        format!("\"{}\"", self.0)
    }
}

fn node_var(layer: usize, i: usize) -> String {
    format!("n{layer}_{i}")
}

/// The Nix expression for `spec`: an attribute set with `root` (depends on
/// everything) and `nodes` (every node derivation, in layer order). Build it
/// with `host.nix_build(file, &["-A", "root"])`.
pub fn closure_expr(spec: &ClosureSpec) -> String {
    let layers = spec.layers.max(1);
    let width = spec.width.max(1);
    let fan_in = spec.fan_in.clamp(1, width);
    let is_multi =
        |index: usize| spec.multi_output_every != 0 && index % spec.multi_output_every == 0;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# Generated by nixq-e2e closures::closure_expr ({} derivations).",
        spec.derivation_count()
    );
    out.push_str("let\n");
    for layer in 0..layers {
        for i in 0..width {
            let index = layer * width + i;
            let var = node_var(layer, i);
            let dname = format!("{}-{layer}-{i}", spec.name);
            let multi = is_multi(index);
            let mut s = NixStr::default();
            s.lit(&format!(
                "echo building {dname}; echo {dname} on stderr >&2\n"
            ));
            s.lit("/bin/mkdir -p $out/bin $out/share/deep/er $out/emptydir\n");
            s.lit(&format!("echo 'node {dname}' > $out/data\n"));
            s.lit(": > $out/empty\n");
            s.lit("echo '#!/bin/sh' > $out/bin/run\n");
            s.lit(&format!("echo 'echo running {dname}' >> $out/bin/run\n"));
            s.lit("/bin/chmod 0755 $out/bin/run\n");
            // printf, not echo: dash's echo interprets backslashes.
            s.lit("while IFS= read -r line; do printf '%s\\n' \"$line\"; done < $src > $out/share/deep/er/src\n");
            s.lit("echo \"src $src\" >> $out/data\n");
            s.lit("/bin/ln -s data $out/share/data-link\n");
            if layer > 0 {
                for k in 0..fan_in {
                    let j = (i + k) % width;
                    let dep = node_var(layer - 1, j);
                    let dep_multi = is_multi((layer - 1) * width + j);
                    // References by content, and by symlink for the first one.
                    s.lit("echo \"dep ")
                        .antiquote(&dep)
                        .lit("\" >> $out/data\n");
                    if k == 0 {
                        s.lit("/bin/ln -s ").antiquote(&dep).lit(" $out/dep\n");
                    }
                    if dep_multi && k == 0 {
                        s.lit("echo \"doc ")
                            .antiquote(&format!("{dep}.doc"))
                            .lit("\" >> $out/data\n");
                    }
                }
            }
            if spec.large_every != 0 && index % spec.large_every == 0 {
                let random = match spec.fill {
                    Fill::Random => true,
                    Fill::Compressible => false,
                    Fill::Alternate => (index / spec.large_every) % 2 == 0,
                };
                let bytes = spec.large_bytes;
                if random {
                    s.lit(&format!("/bin/head -c {bytes} /dev/urandom > $out/blob\n"));
                } else {
                    s.lit(&format!(
                        "/bin/yes 'nixq e2e compressible filler line {dname}' | /bin/head -c {bytes} > $out/blob\n"
                    ));
                }
            }
            if multi {
                s.lit("/bin/mkdir -p $doc/share/doc\n");
                s.lit(&format!(
                    "echo 'documentation of {dname}, built with' $out > $doc/share/doc/README\n"
                ));
            }
            let outputs = if multi {
                "[ \"out\" \"doc\" ]"
            } else {
                "[ \"out\" ]"
            };
            let mut src = NixStr::default();
            src.lit(&format!(
                "source of {dname}\nsecond line with \"quotes\" and \\backslash\n"
            ));
            let _ = writeln!(
                out,
                "  {var} = derivation {{\n    name = \"{dname}\";\n    system = builtins.currentSystem;\n    builder = \"/bin/sh\";\n    outputs = {outputs};\n    src = builtins.toFile \"{dname}-src\" {src};\n    args = [ \"-e\" \"-c\" {script} ];\n    {extra}\n  }};",
                src = src.finish(),
                script = s.finish(),
                extra = spec.extra_attrs,
            );
        }
    }
    let mut root = NixStr::default();
    root.lit(&format!(
        "echo building {}-root\n/bin/mkdir $out\n",
        spec.name
    ));
    for i in 0..width {
        let var = node_var(layers - 1, i);
        root.lit("echo ").antiquote(&var).lit(" >> $out/top\n");
        if is_multi((layers - 1) * width + i) {
            root.lit("echo ")
                .antiquote(&format!("{var}.doc"))
                .lit(" >> $out/top\n");
        }
    }
    let _ = writeln!(
        out,
        "  root = derivation {{\n    name = \"{}-root\";\n    system = builtins.currentSystem;\n    builder = \"/bin/sh\";\n    args = [ \"-e\" \"-c\" {} ];\n  }};",
        spec.name,
        root.finish()
    );
    out.push_str("in {\n  inherit root;\n  nodes = [");
    for layer in 0..layers {
        for i in 0..width {
            let _ = write!(out, " {}", node_var(layer, i));
        }
    }
    out.push_str(" ];\n}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nix_strings_escape_quotes_backslashes_and_antiquotes() {
        let mut s = NixStr::default();
        s.lit("a \"b\" \\ ${x} $y").antiquote("dep");
        assert_eq!(s.finish(), r#""a \"b\" \\ \${x} $y${dep}""#);
    }

    #[test]
    fn expression_has_every_node_and_a_root() {
        let spec = ClosureSpec::new("t");
        let expr = closure_expr(&spec);
        assert_eq!(
            expr.matches("derivation {").count(),
            spec.derivation_count()
        );
        assert!(expr.contains("n2_3 = derivation"));
        assert!(expr.contains("\"doc\""));
        assert!(expr.contains("builtins.toFile"));
        assert!(expr.contains("/dev/urandom"));
        assert!(expr.contains("/bin/yes"));
        assert_eq!(expr, closure_expr(&spec), "deterministic");
    }
}
