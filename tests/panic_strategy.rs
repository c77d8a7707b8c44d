//! Router renewal frees a retired rumqttd router by unwinding its thread
//! (ARCHITECTURE.md, "Router renewal"). Built with `panic = "abort"`, the
//! first renewal would end the whole process instead. The binary refuses to
//! compile without unwinding (`src/panics.rs`); this test catches a profile
//! that asks for abort, in whichever form, before anyone builds with it.

/// Every `panic = …` setting in a manifest, as (line number, value).
fn panic_settings(manifest: &str) -> Vec<(usize, String)> {
    manifest
        .lines()
        .enumerate()
        .filter_map(|(n, line)| {
            let line = line.split('#').next().unwrap_or_default();
            let (key, value) = line.split_once('=')?;
            let key = key.trim().trim_matches('"');
            (key == "panic" || key.ends_with(".panic"))
                .then(|| (n + 1, value.trim().trim_matches('"').to_string()))
        })
        .collect()
}

#[test]
fn no_profile_asks_for_abort_on_panic() {
    let manifest = include_str!("../Cargo.toml");
    for (line, value) in panic_settings(manifest) {
        assert_eq!(
            value, "unwind",
            "Cargo.toml line {line}: router renewal needs panic = \"unwind\""
        );
    }
}

#[test]
fn both_ways_of_writing_the_setting_are_seen() {
    let manifest =
        "[profile.release]\npanic = \"abort\" # smaller\n\nprofile.bench.panic=\"abort\"\n";
    assert_eq!(
        panic_settings(manifest),
        [(2, "abort".to_string()), (4, "abort".to_string())]
    );
}
