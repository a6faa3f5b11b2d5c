//! Derivations: the `.drv` file format (an ATerm, nix-interfaces.md §5.6),
//! parsed into a [`Derivation`], and the [`BasicDerivation`] that the daemon's
//! BuildDerivation takes.
//!
//! ```text
//! Derive([("out","/nix/store/…-x","",""),…],     outputs: (name, path, hashAlgo, hash)
//!        [("/nix/store/…-dep.drv",["out"]),…],    input derivations, outputs used
//!        ["/nix/store/…-src",…],                  input sources
//!        "x86_64-linux","/bin/sh",["-c","…"],     platform, builder, args
//!        [("name","value"),…])                    environment
//! ```
//!
//! Strings are double-quoted; `\"`, `\\`, `\n`, `\r`, `\t` are escapes and
//! any other escaped character stands for itself. Nix writes every list
//! sorted; the parser accepts any order but rejects duplicate keys. Errors
//! give the byte offset and what was expected there. Text must be UTF-8
//! (Nix never writes anything else into the fields nixq reads).
//! The experimental `DrvWithVersion(` form of dynamic derivations is
//! rejected.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::store_path::{StorePath, StorePathError};

/// A parsed `.drv` file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Derivation {
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input derivation → the names of the outputs used.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// One output of a derivation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DerivationOutput {
    /// `None` for floating content-addressed and deferred outputs.
    pub path: Option<StorePath>,
    /// Empty for input-addressed outputs; `sha256`, `r:sha256`,
    /// `text:sha256` … for content-addressed ones.
    pub hash_algo: String,
    /// Base16; empty unless fixed-output.
    pub hash: String,
}

/// A derivation without its input derivations, as BuildDerivation sends it
/// (§5.6): the builder gets the input closure as plain sources.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BasicDerivation {
    pub outputs: BTreeMap<String, DerivationOutput>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// Why a `.drv` text did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("derivation: at byte {offset}: expected {expected}, found {found}")]
pub struct DrvError {
    /// Byte offset into the text.
    pub offset: usize,
    pub expected: String,
    /// What is there instead (a quoted excerpt, or "end of input").
    pub found: String,
}

impl Derivation {
    /// Parse the text of a `.drv` file.
    pub fn parse(text: &[u8]) -> Result<Self, DrvError> {
        let mut p = Parser { text, pos: 0 };
        let drv = p.derivation()?;
        if p.pos != text.len() {
            return Err(p.error("end of input after the closing ')'"));
        }
        Ok(drv)
    }

    /// The BasicDerivation that BuildDerivation sends (§5.6): input
    /// derivations dropped and, when there were any, the input sources
    /// replaced by `input_closure`, the full closure of the inputs the
    /// builder needs (what Nix gives a build hook as `inputs`).
    pub fn to_basic(&self, input_closure: &BTreeSet<StorePath>) -> BasicDerivation {
        let input_srcs = if self.input_drvs.is_empty() {
            self.input_srcs.clone()
        } else {
            input_closure.clone()
        };
        BasicDerivation {
            outputs: self.outputs.clone(),
            input_srcs,
            platform: self.platform.clone(),
            builder: self.builder.clone(),
            args: self.args.clone(),
            env: self.env.clone(),
        }
    }

    /// The `.drv` text, exactly as Nix writes it.
    pub fn to_aterm(&self) -> String {
        let mut out = String::from("Derive([");
        for (i, (name, o)) in self.outputs.iter().enumerate() {
            sep(&mut out, i);
            out.push('(');
            quote(&mut out, name);
            out.push(',');
            quote(&mut out, o.path.as_ref().map_or("", StorePath::as_str));
            out.push(',');
            quote(&mut out, &o.hash_algo);
            out.push(',');
            quote(&mut out, &o.hash);
            out.push(')');
        }
        out.push_str("],[");
        for (i, (drv, names)) in self.input_drvs.iter().enumerate() {
            sep(&mut out, i);
            out.push('(');
            quote(&mut out, drv.as_str());
            out.push(',');
            quote_list(&mut out, names.iter().map(String::as_str));
            out.push(')');
        }
        out.push_str("],");
        quote_list(&mut out, self.input_srcs.iter().map(StorePath::as_str));
        out.push(',');
        quote(&mut out, &self.platform);
        out.push(',');
        quote(&mut out, &self.builder);
        out.push(',');
        quote_list(&mut out, self.args.iter().map(String::as_str));
        out.push_str(",[");
        for (i, (k, v)) in self.env.iter().enumerate() {
            sep(&mut out, i);
            out.push('(');
            quote(&mut out, k);
            out.push(',');
            quote(&mut out, v);
            out.push(')');
        }
        out.push_str("])");
        out
    }
}

fn sep(out: &mut String, i: usize) {
    if i > 0 {
        out.push(',');
    }
}

fn quote(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c => out.push(c),
        }
    }
    out.push('"');
}

fn quote_list<'a>(out: &mut String, items: impl Iterator<Item = &'a str>) {
    out.push('[');
    for (i, item) in items.enumerate() {
        sep(out, i);
        quote(out, item);
    }
    out.push(']');
}

struct Parser<'a> {
    text: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, expected: impl fmt::Display) -> DrvError {
        let found = match self.text.get(self.pos..) {
            Some([]) | None => "end of input".to_owned(),
            Some(rest) => {
                let excerpt = &rest[..rest.len().min(16)];
                format!("{:?}", String::from_utf8_lossy(excerpt))
            }
        };
        DrvError {
            offset: self.pos,
            expected: expected.to_string(),
            found,
        }
    }

    fn expect(&mut self, token: &str) -> Result<(), DrvError> {
        if self.text[self.pos..].starts_with(token.as_bytes()) {
            self.pos += token.len();
            Ok(())
        } else {
            Err(self.error(format_args!("'{token}'")))
        }
    }

    /// Consume `token` if it is next.
    fn eat(&mut self, token: u8) -> bool {
        if self.text.get(self.pos) == Some(&token) {
            self.pos += 1;
            true
        } else {
            false
        }
    }

    fn derivation(&mut self) -> Result<Derivation, DrvError> {
        self.expect("Derive(")?;
        let mut outputs = BTreeMap::new();
        self.list(|p| {
            let start = p.pos;
            p.expect("(")?;
            let name = p.string()?;
            p.expect(",")?;
            let path = p.optional_path()?;
            p.expect(",")?;
            let hash_algo = p.string()?;
            p.expect(",")?;
            let hash = p.string()?;
            p.expect(")")?;
            let output = DerivationOutput {
                path,
                hash_algo,
                hash,
            };
            unique(&mut outputs, name, output, start, "output name")
        })?;
        self.expect(",")?;
        let mut input_drvs = BTreeMap::new();
        self.list(|p| {
            let start = p.pos;
            p.expect("(")?;
            let drv = p.path()?;
            p.expect(",")?;
            let mut names = BTreeSet::new();
            p.list(|p| {
                let start = p.pos;
                let name = p.string()?;
                unique_set(&mut names, name, start, "output name")
            })?;
            p.expect(")")?;
            unique(&mut input_drvs, drv, names, start, "input derivation")
        })?;
        self.expect(",")?;
        let mut input_srcs = BTreeSet::new();
        self.list(|p| {
            let start = p.pos;
            let path = p.path()?;
            unique_set(&mut input_srcs, path, start, "input source")
        })?;
        self.expect(",")?;
        let platform = self.string()?;
        self.expect(",")?;
        let builder = self.string()?;
        self.expect(",")?;
        let mut args = Vec::new();
        self.list(|p| {
            args.push(p.string()?);
            Ok(())
        })?;
        self.expect(",")?;
        let mut env = BTreeMap::new();
        self.list(|p| {
            let start = p.pos;
            p.expect("(")?;
            let key = p.string()?;
            p.expect(",")?;
            let value = p.string()?;
            p.expect(")")?;
            unique(&mut env, key, value, start, "environment variable")
        })?;
        self.expect(")")?;
        Ok(Derivation {
            outputs,
            input_drvs,
            input_srcs,
            platform,
            builder,
            args,
            env,
        })
    }

    /// `[` elem {`,` elem} `]` or `[]`.
    fn list(
        &mut self,
        mut elem: impl FnMut(&mut Self) -> Result<(), DrvError>,
    ) -> Result<(), DrvError> {
        self.expect("[")?;
        if self.eat(b']') {
            return Ok(());
        }
        loop {
            elem(self)?;
            if self.eat(b']') {
                return Ok(());
            }
            if !self.eat(b',') {
                return Err(self.error("',' or ']'"));
            }
        }
    }

    fn string(&mut self) -> Result<String, DrvError> {
        let start = self.pos;
        self.expect("\"")?;
        let mut bytes = Vec::new();
        loop {
            let Some(&b) = self.text.get(self.pos) else {
                return Err(self.error("closing '\"' of the string"));
            };
            self.pos += 1;
            match b {
                b'"' => break,
                b'\\' => {
                    let Some(&escaped) = self.text.get(self.pos) else {
                        return Err(self.error("an escaped character"));
                    };
                    self.pos += 1;
                    bytes.push(match escaped {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    });
                }
                other => bytes.push(other),
            }
        }
        String::from_utf8(bytes).map_err(|_| {
            Parser {
                text: self.text,
                pos: start,
            }
            .error("a UTF-8 string")
        })
    }

    fn path(&mut self) -> Result<StorePath, DrvError> {
        let start = self.pos;
        let text = self.string()?;
        StorePath::parse_any(&text).map_err(|err| self.path_error(start, &err))
    }

    fn optional_path(&mut self) -> Result<Option<StorePath>, DrvError> {
        let start = self.pos;
        let text = self.string()?;
        if text.is_empty() {
            return Ok(None);
        }
        StorePath::parse_any(&text)
            .map(Some)
            .map_err(|err| self.path_error(start, &err))
    }

    fn path_error(&self, start: usize, err: &StorePathError) -> DrvError {
        DrvError {
            offset: start,
            expected: "a store path".to_owned(),
            found: err.to_string(),
        }
    }
}

fn unique<K: Ord, V>(
    map: &mut BTreeMap<K, V>,
    key: K,
    value: V,
    offset: usize,
    what: &str,
) -> Result<(), DrvError> {
    if map.contains_key(&key) {
        return Err(duplicate(offset, what));
    }
    map.insert(key, value);
    Ok(())
}

fn unique_set<K: Ord>(
    set: &mut BTreeSet<K>,
    key: K,
    offset: usize,
    what: &str,
) -> Result<(), DrvError> {
    if !set.insert(key) {
        return Err(duplicate(offset, what));
    }
    Ok(())
}

fn duplicate(offset: usize, what: &str) -> DrvError {
    DrvError {
        offset,
        expected: format!("a unique {what}"),
        found: "a duplicate".to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Nix 2.8 (`nix-instantiate`): two outputs, an input
    /// derivation, a `builtins.toFile` source and every escape.
    const TOP: &str = r##"Derive([("doc","/nix/store/jvmflf8f50j6alcnz8d4chj61sy49d2c-nixq-drv-top-doc","",""),("out","/nix/store/c9pvj16hsrn3lwvnfgry2wm6hyqvw2gr-nixq-drv-top","","")],[("/nix/store/a4yqsrdxssyh7l9yf9lqskd9rljj4d4q-nixq-drv-dep.drv",["out"])],["/nix/store/pd9hyyfx83hqpzqq56i8lzz1bdrjnwvy-nixq-drv-src"],"x86_64-linux","/bin/sh",["-c","read x < /nix/store/c4c8504bbk2p3z1kffx8y6w64mhf0dv2-nixq-drv-dep; echo \"$x\" > $out; echo doc > $doc"],[("builder","/bin/sh"),("doc","/nix/store/jvmflf8f50j6alcnz8d4chj61sy49d2c-nixq-drv-top-doc"),("name","nixq-drv-top"),("out","/nix/store/c9pvj16hsrn3lwvnfgry2wm6hyqvw2gr-nixq-drv-top"),("outputs","out doc"),("src","/nix/store/pd9hyyfx83hqpzqq56i8lzz1bdrjnwvy-nixq-drv-src"),("system","x86_64-linux"),("weird","quote\" backslash\\ tab\t cr\r nl\n done")])"##;

    /// A fixed-output derivation written by Nix 2.8.
    const FIXED: &str = r##"Derive([("out","/nix/store/a1zwrsbj3b0n3j4bdi6c5hpz9ajx38nv-nixq-drv-fo","sha256","992a93455c71fedd36ac9bbc439952c041cf61445958472af479269b8d873513")],[],[],"x86_64-linux","/bin/sh",["-c","echo -n fixed > $out"],[("builder","/bin/sh"),("name","nixq-drv-fo"),("out","/nix/store/a1zwrsbj3b0n3j4bdi6c5hpz9ajx38nv-nixq-drv-fo"),("outputHash","992a93455c71fedd36ac9bbc439952c041cf61445958472af479269b8d873513"),("outputHashAlgo","sha256"),("outputHashMode","flat"),("system","x86_64-linux")])"##;

    fn p(text: &str) -> StorePath {
        StorePath::parse_any(text).expect("path")
    }

    #[test]
    fn parses_real_derivations() {
        let drv = Derivation::parse(TOP.as_bytes()).expect("valid");
        assert_eq!(drv.outputs.len(), 2);
        assert_eq!(
            drv.outputs["out"].path,
            Some(p(
                "/nix/store/c9pvj16hsrn3lwvnfgry2wm6hyqvw2gr-nixq-drv-top"
            ))
        );
        assert_eq!(drv.outputs["doc"].hash_algo, "");
        let dep = p("/nix/store/a4yqsrdxssyh7l9yf9lqskd9rljj4d4q-nixq-drv-dep.drv");
        assert_eq!(drv.input_drvs[&dep], BTreeSet::from(["out".to_owned()]));
        assert_eq!(drv.input_srcs.len(), 1);
        assert_eq!(drv.platform, "x86_64-linux");
        assert_eq!(drv.builder, "/bin/sh");
        assert_eq!(drv.args[0], "-c");
        assert!(drv.args[1].contains("echo \"$x\""));
        assert_eq!(drv.env["weird"], "quote\" backslash\\ tab\t cr\r nl\n done");
        assert_eq!(drv.to_aterm(), TOP, "Nix's own text comes back");

        let fixed = Derivation::parse(FIXED.as_bytes()).expect("valid");
        assert_eq!(fixed.outputs["out"].hash_algo, "sha256");
        assert_eq!(fixed.outputs["out"].hash.len(), 64);
        assert!(fixed.input_drvs.is_empty());
        assert_eq!(fixed.to_aterm(), FIXED);
    }

    #[test]
    fn basic_derivation_takes_the_input_closure() {
        let drv = Derivation::parse(TOP.as_bytes()).expect("valid");
        let closure: BTreeSet<StorePath> = [
            p("/nix/store/c4c8504bbk2p3z1kffx8y6w64mhf0dv2-nixq-drv-dep"),
            p("/nix/store/pd9hyyfx83hqpzqq56i8lzz1bdrjnwvy-nixq-drv-src"),
        ]
        .into();
        let basic = drv.to_basic(&closure);
        assert_eq!(basic.input_srcs, closure);
        assert_eq!(basic.env, drv.env);
        assert_eq!(basic.outputs, drv.outputs);
        // Without input derivations the sources stay as they are.
        let fixed = Derivation::parse(FIXED.as_bytes()).expect("valid");
        assert!(fixed.to_basic(&closure).input_srcs.is_empty());
    }

    #[test]
    fn unknown_escapes_stand_for_themselves() {
        let text = r#"Derive([],[],[],"a\qb","\$x",[],[])"#;
        let drv = Derivation::parse(text.as_bytes()).expect("valid");
        assert_eq!(drv.platform, "aqb");
        assert_eq!(drv.builder, "$x");
    }

    #[test]
    fn hostile_inputs_name_the_position() {
        let cases: &[(&str, usize, &str)] = &[
            ("", 0, "'Derive('"),
            ("Derive(", 7, "'['"),
            ("DrvWithVersion(\"xp-dyn-drv\",[],[])", 0, "'Derive('"),
            ("Derive([],[],[],\"s\",\"b\",[],[])x", 30, "end of input"),
            ("Derive([],[],[],\"s\",\"b\",[],[]", 29, "')'"),
            ("Derive([],[],[],\"s", 18, "closing"),
            ("Derive([],[],[],\"s\\", 19, "escaped"),
            ("Derive([],[],[\"/nix/store/bad\"],\"s\",\"b\",[],[])", 14, "store path"),
            ("Derive([],[],[],\"s\",\"b\",[\"a\";\"b\"],[])", 28, "',' or ']'"),
            (
                "Derive([],[],[],\"s\",\"b\",[],[(\"k\",\"1\"),(\"k\",\"2\")])",
                38,
                "unique environment variable",
            ),
            (
                "Derive([(\"out\",\"\",\"\",\"\"),(\"out\",\"\",\"\",\"\")],[],[],\"s\",\"b\",[],[])",
                25,
                "unique output name",
            ),
        ];
        for (text, offset, expected) in cases {
            let err = Derivation::parse(text.as_bytes()).expect_err(text);
            assert_eq!(err.offset, *offset, "{text}: {err}");
            assert!(err.to_string().contains(expected), "{text}: {err}");
        }
        let not_utf8 = b"Derive([],[],[],\"\xff\",\"b\",[],[])";
        let err = Derivation::parse(not_utf8).expect_err("not UTF-8");
        assert_eq!(err.offset, 16);
        assert!(err.to_string().contains("UTF-8"));
        // Every prefix of a real derivation fails cleanly.
        for cut in 0..TOP.len() {
            assert!(Derivation::parse(&TOP.as_bytes()[..cut]).is_err());
        }
        // Deep nesting cannot happen (the grammar is flat), long input is fine.
        let long = format!("Derive([],[],[],\"{}\",\"b\",[],[])", "x".repeat(1 << 20));
        assert!(Derivation::parse(long.as_bytes()).is_ok());
    }
}
