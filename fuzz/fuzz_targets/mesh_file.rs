//! The mesh file parser and validator, and the excluded-routes file
//! parser, on arbitrary text: problems are reported, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Err(problems) = nexd::mesh::parse(text) {
            // Every problem must point into the text.
            let lines = text.lines().count().max(1) + 1;
            for p in problems {
                assert!(p.line >= 1 && p.line <= lines, "line {} of {lines}", p.line);
            }
        }
        let _ = nexd::exclude::parse_file(text);
    }
});
