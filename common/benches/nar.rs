//! NAR codec throughput: encode (dump a tree from the page cache), decode
//! (validate and hash an in-memory NAR) and restore (to tmpfs).
//!
//! `cargo bench -p nixq-common --bench nar`. The tree is ~1 GiB: three
//! quarters in a few big files, one quarter in many small files (1 byte to
//! 32 KiB, 256 per directory). `NIXQ_BENCH_BYTES` overrides the size, e.g.
//! `NIXQ_BENCH_BYTES=100000000` for a quick run. Throughput is NAR bytes per
//! second, in MB/s (10^6 bytes).

use std::fs;
use std::hint::black_box;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nixq_common::hash::NarHasher;
use nixq_common::nar::{dump_path, restore, Decoder, Restorer};

const DEFAULT_BYTES: u64 = 1 << 30;
const BIG_FILES: u64 = 4;
const SMALL_FILE_MAX: u64 = 32 << 10;
const FILES_PER_DIR: u64 = 256;
/// Each measurement is repeated this many times and the best is kept.
const RUNS: usize = 3;

/// Pseudo-random bytes that do not compress into anything special.
struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }

    fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let word = self.next().to_le_bytes();
            chunk.copy_from_slice(&word[..chunk.len()]);
        }
    }
}

/// Writes the benchmark tree at `root`; returns (files, bytes of contents).
fn generate(root: &Path, total: u64) -> io::Result<(u64, u64)> {
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    fs::create_dir(root)?;
    let big_dir = root.join("big");
    fs::create_dir(&big_dir)?;
    let mut chunk = vec![0; 8 << 20];
    let big_size = total * 3 / 4 / BIG_FILES;
    let (mut files, mut bytes) = (0, 0);
    for i in 0..BIG_FILES {
        let mut file = fs::File::create(big_dir.join(format!("blob-{i}")))?;
        let mut left = big_size;
        while left > 0 {
            let n = left.min(chunk.len() as u64) as usize;
            rng.fill(&mut chunk[..n]);
            file.write_all(&chunk[..n])?;
            left -= n as u64;
        }
        files += 1;
        bytes += big_size;
    }
    let mut dir = PathBuf::new();
    while bytes < total {
        if files % FILES_PER_DIR == 0 || dir.as_os_str().is_empty() {
            dir = root.join(format!("small-{:05}", files / FILES_PER_DIR));
            fs::create_dir_all(&dir)?;
        }
        let size = (rng.next() % SMALL_FILE_MAX + 1).min(total - bytes);
        rng.fill(&mut chunk[..size as usize]);
        fs::write(dir.join(format!("f{files}.dat")), &chunk[..size as usize])?;
        files += 1;
        bytes += size;
    }
    Ok((files, bytes))
}

/// A writer that hashes: what an upload does with the NAR it encodes.
struct HashingSink(NarHasher);

impl Write for HashingSink {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.update(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

fn best<T>(mut run: impl FnMut() -> T) -> (Duration, T) {
    let mut best: Option<(Duration, T)> = None;
    for _ in 0..RUNS {
        let start = Instant::now();
        let value = run();
        let elapsed = start.elapsed();
        if best.as_ref().is_none_or(|(b, _)| elapsed < *b) {
            best = Some((elapsed, value));
        }
    }
    best.unwrap_or_else(|| unreachable!("RUNS > 0"))
}

fn report(what: &str, bytes: u64, elapsed: Duration) {
    let mbps = bytes as f64 / 1e6 / elapsed.as_secs_f64();
    println!(
        "{what:<40} {:>8.3} s {mbps:>9.0} MB/s",
        elapsed.as_secs_f64()
    );
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs us with
    // no such flag and wants a quick smoke run.
    let smoke = !std::env::args().any(|a| a == "--bench");
    let total = match std::env::var("NIXQ_BENCH_BYTES") {
        Ok(text) => text.parse()?,
        Err(_) if smoke => 4 << 20,
        Err(_) => DEFAULT_BYTES,
    };
    let tmp = tempfile::tempdir()?;
    let src = tmp.path().join("tree");
    let start = Instant::now();
    let (files, bytes) = generate(&src, total)?;
    println!(
        "tree: {files} files, {:.0} MB of contents, generated in {:.1} s (in {})",
        bytes as f64 / 1e6,
        start.elapsed().as_secs_f64(),
        tmp.path().display()
    );

    // Warm the page cache and learn the NAR size.
    let nar_size = dump_path(&src, io::sink())?;
    let (elapsed, size) = best(|| dump_path(&src, io::sink()));
    report("encode (dump to io::sink)", size?, elapsed);
    let (elapsed, size) = best(|| dump_path(&src, HashingSink(NarHasher::new())));
    report("encode + sha256", size?, elapsed);

    let mut nar = Vec::with_capacity(nar_size as usize);
    dump_path(&src, &mut nar)?;
    drop(tmp);

    let chunk = 1 << 20;
    let (elapsed, ()) = best(|| {
        let mut decoder = Decoder::whole_container();
        for piece in nar.chunks(chunk) {
            black_box(decoder.consume(piece).expect("valid NAR"));
        }
        decoder.finish().expect("complete NAR");
    });
    report("decode (validate, 1 MiB chunks)", nar.len() as u64, elapsed);
    let (elapsed, ()) = best(|| {
        let mut decoder = Decoder::whole_container();
        let mut hasher = NarHasher::new();
        for piece in nar.chunks(chunk) {
            hasher.update(piece);
            black_box(decoder.consume(piece).expect("valid NAR"));
        }
        decoder.finish().expect("complete NAR");
        black_box(hasher.finish());
    });
    report("decode + sha256", nar.len() as u64, elapsed);

    let shm = Path::new("/dev/shm");
    let restore_dir = if shm.is_dir() {
        tempfile::tempdir_in(shm)?
    } else {
        tempfile::tempdir()?
    };
    let mut elapsed = Duration::MAX;
    for run in 0..RUNS {
        let target = restore_dir.path().join(format!("r{run}"));
        let start = Instant::now();
        black_box(restore(&nar[..], &target)?);
        elapsed = elapsed.min(start.elapsed());
        fs::remove_dir_all(&target)?;
    }
    report(
        &format!("restore + sha256 (to {})", restore_dir.path().display()),
        nar.len() as u64,
        elapsed,
    );

    // The same without hashing, through the event-level API.
    let mut elapsed = Duration::MAX;
    for run in 0..RUNS {
        let target = restore_dir.path().join(format!("n{run}"));
        let start = Instant::now();
        let mut restorer = Restorer::new(&target)?;
        let mut decoder = Decoder::whole_container();
        for piece in nar.chunks(chunk) {
            restorer.apply(&mut decoder, piece)?;
        }
        decoder.finish()?;
        restorer.commit()?;
        elapsed = elapsed.min(start.elapsed());
        fs::remove_dir_all(&target)?;
    }
    report(
        &format!("restore, no hash (to {})", restore_dir.path().display()),
        nar.len() as u64,
        elapsed,
    );
    Ok(())
}
