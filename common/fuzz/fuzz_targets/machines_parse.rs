//! Fuzz the machines-file parser (`nixq_common::machines`).
//!
//! Input: UTF-8 text split on NUL into a main text and included files named
//! `f1`, `f2`, … (so `@f1` includes the second chunk, and includes can nest
//! and cycle). The first byte's low bit picks how foreign URIs are treated.
//! Checked: no panic; every machine is well-formed (a nixq URI whose text
//! re-parses to the same URI, at least one system, a positive finite speed
//! factor); every error points at a line and column of its file; and every
//! URI token parses or fails without panicking on its own.
#![no_main]

use std::io;

use libfuzzer_sys::fuzz_target;
use nixq_common::machines::{parse, ForeignUris, Included, MachineUri, ParseOptions};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let chunks: Vec<&str> = text.split('\0').collect();
    let main = chunks[0];
    let files = &chunks[1..];
    let foreign_uris = if data.first().is_some_and(|b| b & 1 == 1) {
        ForeignUris::Skip
    } else {
        ForeignUris::Reject
    };
    let options = ParseOptions {
        local_system: "x86_64-linux",
        foreign_uris,
    };
    let mut reader = |name: &str, _from: &str| -> io::Result<Option<Included>> {
        if name == "unreadable" {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        let index: Option<usize> = name.strip_prefix('f').and_then(|n| n.parse().ok());
        Ok(index
            .and_then(|i| i.checked_sub(1))
            .and_then(|i| files.get(i))
            .map(|text| Included {
                id: name.to_owned(),
                text: (*text).to_owned(),
            }))
    };
    match parse("machines", main, &options, &mut reader) {
        Ok(machines) => {
            for m in &machines.machines {
                assert!(m.uri.text.starts_with("nixq://"));
                assert_eq!(MachineUri::parse(&m.uri.text).as_ref(), Ok(&m.uri));
                assert!(!m.systems.is_empty());
                let speed = m.speed_factor.get();
                assert!(speed.is_finite() && speed > 0.0);
                assert!(m.origin.line >= 1);
            }
        }
        Err(error) => {
            assert!(error.line >= 1 && error.column >= 1, "{error}");
            let source = if error.file == "machines" {
                Some(main)
            } else {
                reader(&error.file, "")
                    .ok()
                    .flatten()
                    .map(|_| files[error.file[1..].parse::<usize>().expect("f<n>") - 1])
            };
            if let Some(source) = source {
                let line = source
                    .split('\n')
                    .nth(error.line as usize - 1)
                    .expect("the error's line exists");
                assert!(error.column as usize <= line.chars().count() + 1, "{error}");
            }
            let _ = error.to_string();
        }
    }
    for token in main.split_whitespace() {
        if let Ok(uri) = MachineUri::parse(token) {
            assert_eq!(uri.to_string(), token);
            let _ = uri.server_name();
        }
    }
});
