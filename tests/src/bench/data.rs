//! The benchmark's reproducible closures.
//!
//! Every byte is a pure function of a seed: random bytes come from
//! SplitMix64, text-like bytes are words of a seeded vocabulary, so two runs
//! (and two machines) copy the same contents. Three data sets:
//!
//! * [`DataSet::Mixed`]: about 1 GiB in 200 derivation outputs (10 layers ×
//!   20, each node referencing 3 nodes of the layer below) plus a root that
//!   references the top layer; each node holds as many random bytes as
//!   text-like bytes, so half the bytes compress (about 3× with zstd or gzip).
//! * [`DataSet::Small`]: 5,000 `builtins.toFile` paths of 1–7 KiB of text,
//!   each referencing up to 3 earlier ones, plus a root referencing them all.
//! * [`DataSet::Huge`]: one output holding 2 GiB of random bytes.
//!
//! The derivations' builder is the benchmark binary itself in `gen` mode
//! ([`generate_node`]); builders run outside any sandbox, so the binary's
//! absolute path works on every host (only `/nix`, `/etc/nix` and
//! `/etc/hosts` differ between hosts).

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Nodes per layer and layers of [`DataSet::Mixed`]: 200 paths, deep enough
/// that dependency order matters and wide enough for parallel streams.
const MIXED_WIDTH: usize = 20;
const MIXED_LAYERS: usize = 10;
/// References from each mixed node to the layer below.
const MIXED_FAN_IN: usize = 3;
/// Bytes of [`DataSet::Mixed`] and [`DataSet::Huge`] at scale 1, and paths
/// of [`DataSet::Small`]: the sizes issue 3's benchmark section asks for.
const MIXED_BYTES: f64 = 1024.0 * 1024.0 * 1024.0;
const HUGE_BYTES: f64 = 2.0 * 1024.0 * 1024.0 * 1024.0;
const SMALL_PATHS: f64 = 5000.0;
/// Sizes of the small paths: "a few KiB".
const SMALL_MIN: u64 = 1024;
const SMALL_MAX: u64 = 7 * 1024;
/// Words in the text vocabulary: 12 bits of entropy per word of about 6
/// letters, which zstd and gzip compress about 3×, like source code and
/// documentation in a real closure.
const VOCABULARY: usize = 4096;
/// Write buffer of the generator: large sequential writes.
const CHUNK: usize = 1 << 20;

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, statistically good
/// enough that no compressor finds structure in its output.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`; the modulo bias is irrelevant here).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        let mut chunks = buf.chunks_exact_mut(8);
        for c in &mut chunks {
            c.copy_from_slice(&self.next_u64().to_le_bytes());
        }
        let rest = chunks.into_remainder();
        let last = self.next_u64().to_le_bytes();
        rest.copy_from_slice(&last[..rest.len()]);
    }
}

/// Text-like bytes: lines of words from a vocabulary derived from the seed.
/// Only `a-z`, space and newline, so the text is safe inside a Nix string.
#[derive(Debug)]
pub struct TextGen {
    rng: SplitMix64,
    words: Vec<Vec<u8>>,
    column: usize,
}

impl TextGen {
    /// A generator whose vocabulary and word sequence derive from `seed`.
    pub fn new(seed: u64) -> Self {
        // The vocabulary is the same for every seed (like one language), the
        // word sequence differs.
        let mut vocab_rng = SplitMix64::new(0x6E69_7871_2062_656E);
        let words = (0..VOCABULARY)
            .map(|_| {
                let len = 2 + vocab_rng.below(9) as usize;
                (0..len).map(|_| b'a' + vocab_rng.below(26) as u8).collect()
            })
            .collect();
        Self {
            rng: SplitMix64::new(seed),
            words,
            column: 0,
        }
    }

    /// Appends about `n` bytes (exactly `n`) of text to `out`.
    pub fn push(&mut self, out: &mut Vec<u8>, n: usize) {
        let end = out.len() + n;
        while out.len() < end {
            let r = self.rng.next_u64();
            // Two words per random draw.
            for part in [r & 0xFFF, (r >> 12) & 0xFFF] {
                let word = &self.words[part as usize];
                out.extend_from_slice(word);
                self.column += word.len() + 1;
                if self.column > 72 {
                    out.push(b'\n');
                    self.column = 0;
                } else {
                    out.push(b' ');
                }
            }
        }
        out.truncate(end);
    }
}

/// What `nixq-bench gen` writes into `$out` (a directory).
#[derive(Debug, Clone, Default)]
pub struct NodeSpec {
    pub seed: u64,
    /// Bytes of `$out/random.bin` (none if 0).
    pub random: u64,
    /// Bytes of `$out/text.txt` (none if 0).
    pub text: u64,
    /// Written verbatim to `$out/refs`: the dependency paths, which makes
    /// them references of the output.
    pub refs: String,
}

/// The builder: writes `spec`'s files into the new directory `out`.
pub fn generate_node(spec: &NodeSpec, out: &Path) -> std::io::Result<()> {
    std::fs::create_dir(out)?;
    std::fs::write(out.join("refs"), format!("{}\n", spec.refs))?;
    let mut buf = vec![0u8; CHUNK];
    if spec.random > 0 {
        let mut rng = SplitMix64::new(spec.seed);
        let mut w = File::create(out.join("random.bin"))?;
        let mut left = spec.random;
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            rng.fill(&mut buf[..n]);
            w.write_all(&buf[..n])?;
            left -= n as u64;
        }
    }
    if spec.text > 0 {
        let mut gen = TextGen::new(spec.seed ^ 0x7465_7874);
        let mut w = BufWriter::new(File::create(out.join("text.txt"))?);
        let mut left = spec.text;
        let mut text = Vec::with_capacity(CHUNK);
        while left > 0 {
            let n = left.min(CHUNK as u64) as usize;
            text.clear();
            gen.push(&mut text, n);
            w.write_all(&text)?;
            left -= n as u64;
        }
        w.flush()?;
    }
    Ok(())
}

/// The three data sets (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DataSet {
    Mixed,
    Small,
    Huge,
}

impl DataSet {
    pub const ALL: [Self; 3] = [Self::Mixed, Self::Small, Self::Huge];

    /// Short name, for `--datasets` and file names.
    pub fn key(self) -> &'static str {
        match self {
            Self::Mixed => "mixed",
            Self::Small => "small",
            Self::Huge => "huge",
        }
    }

    /// Description at `scale`, for the table.
    pub fn describe(self, scale: f64) -> String {
        match self {
            Self::Mixed => format!(
                "{} paths, {} (half compressible)",
                MIXED_WIDTH * MIXED_LAYERS + 1,
                human_bytes((MIXED_BYTES * scale) as u64)
            ),
            Self::Small => format!("{} small paths", small_count(scale) + 1),
            Self::Huge => format!(
                "1 path, {} random",
                human_bytes((HUGE_BYTES * scale) as u64)
            ),
        }
    }

    /// The Nix expression generating the set at `scale` with `builder` (the
    /// benchmark binary). Build `Mixed` and `Huge` with `nix-build -A root`;
    /// evaluate `Small` with `nix-instantiate --eval --read-write-mode`.
    pub fn expression(self, scale: f64, builder: &Path) -> String {
        match self {
            Self::Mixed => mixed_expr(scale, builder),
            Self::Small => small_expr(scale),
            Self::Huge => huge_expr(scale, builder),
        }
    }
}

fn small_count(scale: f64) -> usize {
    ((SMALL_PATHS * scale).round() as usize).max(1)
}

/// `1.5 GiB`, `200 MiB`, `12 KiB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["B", "KiB", "MiB", "GiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 || v >= 100.0 || (v - v.round()).abs() < 0.05 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

fn derivation(name: &str, builder: &Path, spec: &NodeSpec) -> String {
    format!(
        "derivation {{ name = \"{name}\"; system = builtins.currentSystem; builder = \"{}\"; \
         args = [ \"gen\" \"--seed\" \"{}\" \"--random\" \"{}\" \"--text\" \"{}\" \"--refs\" \"{}\" ]; }}",
        builder.display(),
        spec.seed,
        spec.random,
        spec.text,
        spec.refs
    )
}

fn mixed_expr(scale: f64, builder: &Path) -> String {
    let total = (MIXED_BYTES * scale) as u64;
    let nodes = MIXED_WIDTH * MIXED_LAYERS;
    // Sizes spread over a factor of 20 (e^3), normalised to `total`.
    let mut rng = SplitMix64::new(0x006D_6978_6564);
    let weights: Vec<f64> = (0..nodes)
        .map(|_| (3.0 * (rng.below(1 << 20) as f64 / f64::from(1 << 20))).exp())
        .collect();
    let sum: f64 = weights.iter().sum();
    let mut sizes: Vec<u64> = weights
        .iter()
        .map(|w| (w / sum * total as f64) as u64)
        .collect();
    let assigned: u64 = sizes.iter().sum();
    if let Some(last) = sizes.last_mut() {
        *last += total.saturating_sub(assigned);
    }
    let mut out = String::from("# nixq-bench: the mixed data set\nlet\n");
    for layer in 0..MIXED_LAYERS {
        for i in 0..MIXED_WIDTH {
            let index = layer * MIXED_WIDTH + i;
            let refs = if layer == 0 {
                String::new()
            } else {
                (0..MIXED_FAN_IN)
                    .map(|k| format!("${{n{}_{}}}", layer - 1, (i + k * 7) % MIXED_WIDTH))
                    .collect::<Vec<_>>()
                    .join(" ")
            };
            let size = sizes[index];
            let spec = NodeSpec {
                seed: 1000 + index as u64,
                random: size / 2,
                text: size - size / 2,
                refs,
            };
            let _ = writeln!(
                out,
                "  n{layer}_{i} = {};",
                derivation(&format!("bench-mixed-{layer}-{i}"), builder, &spec)
            );
        }
    }
    let top: Vec<String> = (0..MIXED_WIDTH)
        .map(|i| format!("${{n{}_{i}}}", MIXED_LAYERS - 1))
        .collect();
    let root = NodeSpec {
        seed: 1,
        refs: top.join(" "),
        ..NodeSpec::default()
    };
    let _ = writeln!(
        out,
        "  root = {};\nin {{ inherit root; }}",
        derivation("bench-mixed-root", builder, &root)
    );
    out
}

fn huge_expr(scale: f64, builder: &Path) -> String {
    let spec = NodeSpec {
        seed: 2,
        random: (HUGE_BYTES * scale) as u64,
        ..NodeSpec::default()
    };
    format!(
        "# nixq-bench: the huge data set\n{{ root = {}; }}\n",
        derivation("bench-huge", builder, &spec)
    )
}

fn small_expr(scale: f64) -> String {
    let count = small_count(scale);
    let mut rng = SplitMix64::new(0x0073_6D61_6C6C);
    let mut text = TextGen::new(3);
    let mut out = String::from("# nixq-bench: the small data set\nlet\n");
    let mut buf = Vec::new();
    for i in 0..count {
        buf.clear();
        let size = SMALL_MIN + rng.below(SMALL_MAX - SMALL_MIN);
        text.push(&mut buf, size as usize);
        let mut body = String::from_utf8_lossy(&buf).into_owned();
        if i > 0 {
            for _ in 0..rng.below(4) {
                let _ = write!(body, "\n${{b{}}}", rng.below(i as u64));
            }
        }
        let _ = writeln!(
            out,
            "  b{i} = builtins.toFile \"bench-small-{i}\" \"{body}\";"
        );
    }
    out.push_str("in builtins.toFile \"bench-small-root\" \"");
    for i in 0..count {
        let _ = writeln!(out, "${{b{i}}}");
    }
    out.push_str("\"\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generators_are_deterministic() {
        let mut a = vec![0u8; 1001];
        let mut b = vec![0u8; 1001];
        SplitMix64::new(7).fill(&mut a);
        SplitMix64::new(7).fill(&mut b);
        assert_eq!(a, b);
        let (mut x, mut y) = (Vec::new(), Vec::new());
        TextGen::new(1).push(&mut x, 5000);
        TextGen::new(1).push(&mut y, 5000);
        assert_eq!(x, y);
        assert_eq!(x.len(), 5000);
        assert!(x
            .iter()
            .all(|c| c.is_ascii_lowercase() || *c == b' ' || *c == b'\n'));
    }

    #[test]
    fn expressions_have_the_advertised_shape() {
        let b = Path::new("/bin/nixq-bench");
        let mixed = DataSet::Mixed.expression(0.01, b);
        assert_eq!(mixed.matches("derivation {").count(), 201);
        assert_eq!(mixed, DataSet::Mixed.expression(0.01, b));
        let small = DataSet::Small.expression(0.01, b);
        assert_eq!(small.matches("builtins.toFile").count(), 51);
        assert_eq!(human_bytes(3 << 29), "1.5 GiB");
        assert_eq!(human_bytes(200 << 20), "200 MiB");
    }
}
