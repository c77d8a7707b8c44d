//! Auth files for tests: hashes and bridge tokens made by `axion passwd`,
//! as an operator makes them.

use std::process::Command;

use super::axion_bin;

/// `axion passwd` output for `password`: `password = "<hash>"`.
pub fn hash_line(password: &str) -> String {
    let out = Command::new(axion_bin())
        .args(["passwd", "--password", password])
        .output()
        .expect("run axion passwd");
    assert!(out.status.success(), "axion passwd failed: {out:?}");
    String::from_utf8(out.stdout)
        .expect("utf-8")
        .trim()
        .to_string()
}

/// A fresh bridge token for `user`: (token, `tokens = [...]` line).
pub fn token_lines(user: &str) -> (String, String) {
    let out = Command::new(axion_bin())
        .args(["passwd", "--token-for", user])
        .output()
        .expect("run axion passwd --token-for");
    assert!(out.status.success(), "axion passwd failed: {out:?}");
    let text = String::from_utf8(out.stdout).expect("utf-8");
    let mut lines = text.lines();
    let token = lines
        .next()
        .and_then(|l| l.strip_prefix("token = \""))
        .and_then(|l| l.strip_suffix('"'))
        .expect("token line")
        .to_string();
    (token, lines.next().expect("tokens line").to_string())
}
