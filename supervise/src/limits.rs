//! How many instances of a service may run at once: from the command line
//! (`--max-instances SERVICE=N`) and from a PM2 ecosystem file, as the
//! legacy heartbeat service read it (`apps[].instances`, 1 when absent).
//!
//! An `ecosystem.config.js` is JavaScript: it is evaluated by `node` (the
//! one program that can read it faithfully), and its `apps` printed as
//! JSON; a `.json` file is read directly.

use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum LimitError {
    #[error("--max-instances {0:?} must be SERVICE=N with N a whole number of at least 1")]
    Flag(String),
    #[error("cannot read the ecosystem file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "cannot evaluate the ecosystem file {path} with node (is Node.js installed?): {detail}"
    )]
    Node { path: PathBuf, detail: String },
    #[error("the ecosystem file {path} is not what PM2 reads: {detail}")]
    Format { path: PathBuf, detail: String },
}

/// Instance limits by service name; a service not listed has none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InstanceLimits(BTreeMap<String, usize>);

impl InstanceLimits {
    pub fn get(&self, service: &str) -> Option<usize> {
        self.0.get(service).copied()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Adds `SERVICE=N` flags; a flag overrides the ecosystem file.
    pub fn with_flags<S: AsRef<str>>(mut self, flags: &[S]) -> Result<Self, LimitError> {
        for flag in flags {
            let flag = flag.as_ref();
            let (name, n) = flag
                .split_once('=')
                .ok_or_else(|| LimitError::Flag(flag.to_string()))?;
            let n: usize = n
                .trim()
                .parse()
                .ok()
                .filter(|n| *n >= 1)
                .ok_or_else(|| LimitError::Flag(flag.to_string()))?;
            if name.trim().is_empty() {
                return Err(LimitError::Flag(flag.to_string()));
            }
            self.0.insert(name.trim().to_string(), n);
        }
        Ok(self)
    }

    /// Reads a PM2 ecosystem file (`.js`, `.cjs` or `.json`).
    pub fn from_ecosystem(path: &Path) -> Result<Self, LimitError> {
        let is_json = path.extension().is_some_and(|e| e == "json");
        let config: Value = if is_json {
            let raw = std::fs::read(path).map_err(|source| LimitError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            serde_json::from_slice(&raw).map_err(|e| LimitError::Format {
                path: path.to_path_buf(),
                detail: e.to_string(),
            })?
        } else {
            evaluate_js(path)?
        };
        Self::from_config(&config).map_err(|detail| LimitError::Format {
            path: path.to_path_buf(),
            detail,
        })
    }

    fn from_config(config: &Value) -> Result<Self, String> {
        let apps = config
            .get("apps")
            .and_then(Value::as_array)
            .ok_or("it has no `apps` array")?;
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1);
        let mut limits = BTreeMap::new();
        for app in apps {
            let Some(name) = app.get("name").and_then(Value::as_str) else {
                continue;
            };
            let n = match app.get("instances") {
                None | Some(Value::Null) => 1,
                Some(v) => instances(v, cpus).ok_or_else(|| {
                    format!("app {name:?} has instances {v}, not a number or \"max\"")
                })?,
            };
            limits.insert(name.to_string(), n);
        }
        Ok(Self(limits))
    }
}

/// PM2's `instances`: a number, `"max"` (or 0) for one per CPU, and a
/// negative number for all CPUs but that many.
fn instances(v: &Value, cpus: usize) -> Option<usize> {
    let n: i64 = match v {
        Value::Number(n) => n.as_i64()?,
        Value::String(s) if s.eq_ignore_ascii_case("max") => 0,
        Value::String(s) => s.trim().parse().ok()?,
        _ => return None,
    };
    let cpus = cpus as i64;
    Some(match n {
        0 => cpus,
        n if n < 0 => (cpus + n).max(1),
        n => n,
    } as usize)
}

fn evaluate_js(path: &Path) -> Result<Value, LimitError> {
    let absolute = std::fs::canonicalize(path).map_err(|source| LimitError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let out = std::process::Command::new("node")
        .arg("-e")
        .arg("const c = require(process.argv[1]); process.stdout.write(JSON.stringify({apps: (c && c.apps) || null}))")
        .arg(&absolute)
        .output()
        .map_err(|e| LimitError::Node {
            path: path.to_path_buf(),
            detail: e.to_string(),
        })?;
    if !out.status.success() {
        return Err(LimitError::Node {
            path: path.to_path_buf(),
            detail: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    serde_json::from_slice(&out.stdout).map_err(|e| LimitError::Format {
        path: path.to_path_buf(),
        detail: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_pm2_instances_the_way_pm2_does() {
        let l = InstanceLimits::from_config(&json!({"apps": [
            {"name": "a"}, {"name": "b", "instances": 3}, {"name": "c", "instances": "max"},
            {"name": "d", "instances": -1}, {"name": "e", "instances": "2"}, {"script": "x.js"}
        ]}))
        .unwrap();
        let cpus = std::thread::available_parallelism().unwrap().get();
        assert_eq!(l.get("a"), Some(1));
        assert_eq!(l.get("b"), Some(3));
        assert_eq!(l.get("c"), Some(cpus));
        assert_eq!(l.get("d"), Some((cpus - 1).max(1)));
        assert_eq!(l.get("e"), Some(2));
        assert_eq!(l.get("x"), None);
        assert!(
            InstanceLimits::from_config(&json!({"apps": [{"name": "a", "instances": true}]}))
                .is_err()
        );
        assert!(InstanceLimits::from_config(&json!({})).is_err());
    }

    #[test]
    fn flags_override_and_bad_flags_are_refused() {
        let l = InstanceLimits::default()
            .with_flags(&["embed=2", "embed=4", "ocr=1"])
            .unwrap();
        assert_eq!(l.get("embed"), Some(4));
        assert_eq!(l.get("ocr"), Some(1));
        for bad in ["embed", "embed=0", "embed=x", "=3"] {
            assert!(
                InstanceLimits::default().with_flags(&[bad]).is_err(),
                "{bad}"
            );
        }
    }

    #[test]
    fn reads_json_files_and_says_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ecosystem.config.json");
        std::fs::write(&path, r#"{"apps":[{"name":"eco","instances":2}]}"#).unwrap();
        assert_eq!(
            InstanceLimits::from_ecosystem(&path).unwrap().get("eco"),
            Some(2)
        );
        std::fs::write(&path, "{nope").unwrap();
        let err = InstanceLimits::from_ecosystem(&path)
            .unwrap_err()
            .to_string();
        assert!(err.contains("ecosystem.config.json"), "{err}");
    }
}
