//! A Containerfile carried out without a container engine, for
//! `tests/packaging.rs`: each instruction's effect is reproduced under a
//! temporary directory standing for each stage's `/`, as far as a test can
//! go without root, an engine or a release build. An instruction, a flag
//! or a `RUN` command it does not know is an error, so a step added to the
//! file cannot go unchecked.
//!
//! What stands for what:
//! - `cargo build [--release] [--locked] --bin <bin>` is not run (a release
//!   build takes many minutes): the directory it would run in must hold
//!   `Cargo.toml` and `Cargo.lock`, `--locked` is checked by `cargo metadata
//!   --locked --offline` (it fails where the build would, on a lock file
//!   that does not match the manifests), `<bin>` must be
//!   a binary of the workspace, and its product (`target/<profile>/<bin>`
//!   under the work directory) is the binary this test run built (debug);
//! - `COPY` mounts its source at its destination, nothing is copied; from
//!   another stage it takes only what that stage built;
//! - `RUN useradd` creates the home directory; `USER` is checked against
//!   the users created, not switched to (the test does not run as root);
//! - `WORKDIR` and `VOLUME` create their directories under the root.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

/// One instruction: its keyword (upper case), its arguments, and the line
/// it starts on.
pub struct Instruction {
    pub line: usize,
    pub keyword: String,
    pub args: String,
}

/// The instructions of `text`: comments dropped, continuation lines
/// joined.
pub fn parse(text: &str) -> Vec<Instruction> {
    let mut out = Vec::new();
    let mut open: Option<(usize, String)> = None;
    let mut push = |line: usize, text: String| {
        let (keyword, args) = text.split_once(char::is_whitespace).unwrap_or((&text, ""));
        out.push(Instruction {
            line,
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_string(),
        });
    };
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        if line.starts_with('#') || (line.is_empty() && open.is_none()) {
            continue;
        }
        let (start, mut joined) = open.take().unwrap_or((i + 1, String::new()));
        let (body, continued) = match line.strip_suffix('\\') {
            Some(body) => (body.trim(), true),
            None => (line, false),
        };
        if !joined.is_empty() && !body.is_empty() {
            joined.push(' ');
        }
        joined.push_str(body);
        if continued {
            open = Some((start, joined));
        } else {
            push(start, joined);
        }
    }
    if let Some((start, joined)) = open {
        push(start, joined);
    }
    out
}

/// One stage: what its instructions set up.
pub struct Stage {
    pub name: Option<String>,
    /// The directory standing for this stage's `/`.
    root: PathBuf,
    pub workdir: String,
    /// Image paths bound to paths on this machine (`COPY`, a build's
    /// product, `docker run -v`), longest match first when resolving.
    mounts: Vec<(String, PathBuf)>,
    /// Image paths this stage built, the only ones another stage may copy.
    products: Vec<String>,
    pub env: Vec<(String, String)>,
    /// Users created, with their home directories.
    pub users: HashMap<String, String>,
    pub user: Option<String>,
    pub volumes: Vec<String>,
    pub exposed: Vec<u16>,
    pub stop_signal: Option<i32>,
    pub entrypoint: Option<Vec<String>>,
}

impl Stage {
    fn new(name: Option<String>, root: PathBuf) -> Stage {
        Stage {
            name,
            root,
            workdir: "/".into(),
            mounts: Vec::new(),
            products: Vec::new(),
            env: Vec::new(),
            users: HashMap::new(),
            user: None,
            volumes: Vec::new(),
            exposed: Vec::new(),
            stop_signal: None,
            entrypoint: None,
        }
    }

    /// `path` made absolute against the work directory, `.` and `..`
    /// taken out.
    pub fn absolute(&self, path: &str) -> String {
        let joined = if path.starts_with('/') {
            path.to_string()
        } else {
            format!("{}/{path}", self.workdir)
        };
        let mut parts: Vec<&str> = Vec::new();
        for part in joined.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    parts.pop();
                }
                p => parts.push(p),
            }
        }
        format!("/{}", parts.join("/"))
    }

    /// Where the image path `path` is on this machine.
    pub fn resolve(&self, path: &str) -> PathBuf {
        let path = self.absolute(path);
        let under = |at: &str| path == at || path.starts_with(&format!("{at}/"));
        let mount = self
            .mounts
            .iter()
            .filter(|(at, _)| under(at))
            .max_by_key(|(at, _)| at.len());
        match mount {
            Some((at, host)) => match path[at.len()..].trim_start_matches('/') {
                "" => host.clone(),
                rest => host.join(rest),
            },
            None => self.root.join(path.trim_start_matches('/')),
        }
    }

    /// Binds `host` at the image path `at`, as `docker run -v` does.
    pub fn mount(&mut self, at: &str, host: &Path) {
        let at = self.absolute(at);
        self.mounts.push((at, host.to_path_buf()));
    }

    /// The value `ENV` gave `key`.
    pub fn env_var(&self, key: &str) -> Option<&str> {
        self.env
            .iter()
            .rev()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// The `ENTRYPOINT` as `docker run -e …` would start it: only the
    /// image's environment and `env` (later wins), every argument or value
    /// that is an absolute path resolved, in the work directory.
    pub fn command(&self, env: &[(&str, &str)]) -> Command {
        let entry = self
            .entrypoint
            .as_ref()
            .expect("the image has an ENTRYPOINT");
        let mapped = |s: &str| {
            if s.starts_with('/') {
                self.resolve(s).into_os_string()
            } else {
                s.into()
            }
        };
        let mut cmd = Command::new(self.resolve(&entry[0]));
        cmd.args(entry[1..].iter().map(|a| mapped(a)))
            .current_dir(self.resolve(&self.workdir))
            .env_clear();
        for (k, v) in &self.env {
            cmd.env(k, mapped(v));
        }
        for (k, v) in env {
            cmd.env(k, mapped(v));
        }
        cmd
    }
}

/// Every stage of a carried-out Containerfile; the last is the image.
pub struct Image {
    pub stages: Vec<Stage>,
    _dir: tempfile::TempDir,
}

impl Image {
    pub fn image(&self) -> &Stage {
        self.stages.last().expect("a stage")
    }

    pub fn image_mut(&mut self) -> &mut Stage {
        self.stages.last_mut().expect("a stage")
    }
}

/// Carries out `text` with `context` as the build context; `binaries`
/// names the built binaries that stand for what `cargo build` would make.
pub fn carry_out(
    text: &str,
    context: &Path,
    binaries: &HashMap<&str, PathBuf>,
) -> Result<Image, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let mut stages: Vec<Stage> = Vec::new();
    for ins in parse(text) {
        let at = |why: String| format!("line {}: {} {}: {why}", ins.line, ins.keyword, ins.args);
        if ins.keyword == "FROM" {
            let name = match ins.args.split_whitespace().collect::<Vec<_>>()[..] {
                [image] if !image.starts_with("--") => None,
                [image, r#as, name]
                    if !image.starts_with("--") && r#as.eq_ignore_ascii_case("as") =>
                {
                    Some(name.to_string())
                }
                _ => return Err(at("expected `FROM <image> [AS <name>]`".into())),
            };
            let root = dir.path().join(format!("stage-{}", stages.len()));
            std::fs::create_dir_all(&root).map_err(|e| at(e.to_string()))?;
            stages.push(Stage::new(name, root));
            continue;
        }
        // A COPY from an earlier stage reads it before this one is changed.
        let copied = if ins.keyword == "COPY" {
            Some(copy_source(&stages, context, &ins.args).map_err(at)?)
        } else {
            None
        };
        let stage = stages
            .last_mut()
            .ok_or_else(|| at("before any FROM".into()))?;
        match ins.keyword.as_str() {
            "WORKDIR" => {
                stage.workdir = stage.absolute(&ins.args);
                create(&stage.resolve(&stage.workdir)).map_err(at)?;
            }
            "COPY" => {
                let (source, host, dest) = copied.expect("resolved above");
                let dest = match dest.strip_suffix('/') {
                    Some(dir) => format!("{dir}/{}", source.rsplit('/').next().unwrap_or("")),
                    None => dest,
                };
                stage.mount(&dest, &host);
            }
            "RUN" => run(stage, &ins.args, binaries).map_err(at)?,
            "USER" => {
                let name = ins.args.split(':').next().unwrap_or("");
                if name != "root" && !stage.users.contains_key(name) {
                    return Err(at(format!("no user {name:?} was created in this stage")));
                }
                stage.user = Some(name.to_string());
            }
            "VOLUME" => {
                let paths: Vec<String> = if ins.args.starts_with('[') {
                    serde_json::from_str(&ins.args).map_err(|e| at(e.to_string()))?
                } else {
                    ins.args.split_whitespace().map(str::to_string).collect()
                };
                for path in paths {
                    let path = stage.absolute(&path);
                    create(&stage.resolve(&path)).map_err(at)?;
                    stage.volumes.push(path);
                }
            }
            "EXPOSE" => {
                for port in ins.args.split_whitespace() {
                    let port = port.strip_suffix("/tcp").unwrap_or(port);
                    let port = port
                        .parse()
                        .map_err(|_| at(format!("{port:?} is not a TCP port")))?;
                    stage.exposed.push(port);
                }
            }
            "ENV" => {
                for pair in ins.args.split_whitespace() {
                    match pair.split_once('=') {
                        Some((k, v)) if !k.is_empty() && !v.starts_with(['"', '\'']) => {
                            stage.env.push((k.to_string(), v.to_string()))
                        }
                        _ => {
                            return Err(at(format!("only unquoted KEY=value pairs, not {pair:?}")))
                        }
                    }
                }
            }
            "STOPSIGNAL" => {
                let signal = match ins.args.as_str() {
                    "SIGHUP" => 1,
                    "SIGINT" => 2,
                    "SIGQUIT" => 3,
                    "SIGKILL" => 9,
                    "SIGTERM" => 15,
                    n => n.parse().map_err(|_| at("unknown signal".into()))?,
                };
                stage.stop_signal = Some(signal);
            }
            "ENTRYPOINT" => {
                // The shell form runs under `/bin/sh -c`, which would get
                // the stop signal instead of the program.
                let argv: Vec<String> = serde_json::from_str(&ins.args)
                    .map_err(|_| at("only the exec form `[\"program\", …]`".into()))?;
                if argv.is_empty() {
                    return Err(at("no program".into()));
                }
                stage.entrypoint = Some(argv);
            }
            _ => return Err(at("an instruction this check does not know".into())),
        }
    }
    if stages.is_empty() {
        return Err("no FROM".into());
    }
    Ok(Image { stages, _dir: dir })
}

fn create(path: &Path) -> Result<(), String> {
    std::fs::create_dir_all(path).map_err(|e| format!("{}: {e}", path.display()))
}

/// `COPY [--from=<stage>] <source> <dest>`: the source as written, where
/// it is on this machine, and the destination.
fn copy_source(
    stages: &[Stage],
    context: &Path,
    args: &str,
) -> Result<(String, PathBuf, String), String> {
    let mut from = None;
    let mut paths = Vec::new();
    for word in args.split_whitespace() {
        match word.strip_prefix("--from=") {
            Some(name) => from = Some(name),
            None if word.starts_with("--") => return Err(format!("unknown flag {word}")),
            None => paths.push(word),
        }
    }
    let [source, dest] = paths[..] else {
        return Err("expected one source and one destination".into());
    };
    let host = match from {
        Some(name) => {
            let stage = stages
                .iter()
                .find(|s| s.name.as_deref() == Some(name))
                .ok_or_else(|| format!("no earlier stage {name}"))?;
            let wanted = stage.absolute(source);
            if !stage.products.contains(&wanted) {
                return Err(format!("stage {name} did not build {wanted}"));
            }
            stage.resolve(&wanted)
        }
        None => {
            if source.starts_with('/') || source.split('/').any(|p| p == "..") {
                return Err(format!("{source} is outside the build context"));
            }
            context.join(source)
        }
    };
    if !host.exists() {
        return Err(format!("{source} does not exist ({})", host.display()));
    }
    Ok((source.to_string(), host, dest.to_string()))
}

/// A `RUN` step this check knows, in exec form or as a plain command line
/// (no shell syntax: `&&`, `;`, pipes or substitutions could hide a second
/// step).
fn run(stage: &mut Stage, args: &str, binaries: &HashMap<&str, PathBuf>) -> Result<(), String> {
    let argv: Vec<String> = if args.starts_with('[') {
        serde_json::from_str(args).map_err(|e| e.to_string())?
    } else if args.contains(['&', ';', '|', '<', '>', '$', '`', '(', ')', '\'', '"', '\\']) {
        return Err("shell syntax this check cannot follow".into());
    } else {
        args.split_whitespace().map(str::to_string).collect()
    };
    let argv: Vec<&str> = argv.iter().map(String::as_str).collect();
    match argv[..] {
        ["cargo", "build", ref flags @ ..] => cargo_build(stage, flags, binaries),
        ["useradd", ref flags @ ..] => useradd(stage, flags),
        _ => Err("a command this check does not know".into()),
    }
}

fn cargo_build(
    stage: &mut Stage,
    flags: &[&str],
    binaries: &HashMap<&str, PathBuf>,
) -> Result<(), String> {
    let (mut release, mut locked, mut bin) = (false, false, None);
    let mut flags = flags.iter();
    while let Some(flag) = flags.next() {
        match *flag {
            "--release" => release = true,
            "--locked" => locked = true,
            "--bin" => bin = flags.next().copied(),
            f => match f.strip_prefix("--bin=") {
                Some(b) => bin = Some(b),
                None => return Err(format!("cargo build flag {f} is not known to this check")),
            },
        }
    }
    let bin = bin.ok_or("cargo build without --bin: which binary is not known")?;
    let dir = stage.resolve(&stage.workdir);
    for file in ["Cargo.toml", "Cargo.lock"] {
        if !dir.join(file).is_file() {
            return Err(format!(
                "no {file} in {} ({})",
                stage.workdir,
                dir.display()
            ));
        }
    }
    let metadata = metadata(&dir, locked)?;
    let members: Vec<&serde_json::Value> = metadata["workspace_members"]
        .as_array()
        .map(|m| m.iter().collect())
        .unwrap_or_default();
    let is_bin = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| members.contains(&&p["id"]))
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .any(|t| {
            t["name"] == bin
                && t["kind"]
                    .as_array()
                    .is_some_and(|k| k.contains(&"bin".into()))
        });
    if !is_bin {
        return Err(format!("{bin} is not a binary of the workspace"));
    }
    let built = binaries
        .get(bin)
        .ok_or_else(|| format!("no built binary stands for {bin}"))?;
    let profile = if release { "release" } else { "debug" };
    let product = stage.absolute(&format!("target/{profile}/{bin}"));
    stage.mount(&product, built);
    stage.products.push(product);
    Ok(())
}

/// `cargo metadata` of the workspace in `dir`, offline; with `locked`, as
/// `--locked` would check it: a `Cargo.lock` that does not match the
/// manifests fails here as it would fail the build. Asked once per test
/// binary: the answer does not change while the tests run.
fn metadata(dir: &Path, locked: bool) -> Result<serde_json::Value, String> {
    type Answers = Mutex<HashMap<(PathBuf, bool), Result<serde_json::Value, String>>>;
    static ANSWERS: OnceLock<Answers> = OnceLock::new();
    let mut answers = ANSWERS
        .get_or_init(Answers::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    let ask = || {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let mut cmd = Command::new(cargo);
        // The build stage's platform: Debian on this machine's
        // architecture. Crates for other platforms are neither needed
        // there nor downloaded here.
        let platform = format!("{}-unknown-linux-gnu", std::env::consts::ARCH);
        cmd.args(["metadata", "--offline", "--format-version", "1"])
            .args(["--filter-platform", &platform])
            .current_dir(dir);
        if locked {
            cmd.arg("--locked");
        }
        let out = cmd.output().map_err(|e| format!("cargo metadata: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "cargo metadata{} fails: {}",
                if locked { " --locked" } else { "" },
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        serde_json::from_slice(&out.stdout).map_err(|e| e.to_string())
    };
    answers
        .entry((dir.to_path_buf(), locked))
        .or_insert_with(ask)
        .clone()
}

fn useradd(stage: &mut Stage, flags: &[&str]) -> Result<(), String> {
    let (mut home, mut create_home, mut name) = (None, false, None);
    let mut flags = flags.iter();
    while let Some(flag) = flags.next() {
        match *flag {
            "--system" => {}
            "--create-home" => create_home = true,
            "--home-dir" => home = flags.next().copied(),
            f if f.starts_with('-') => {
                return Err(format!("useradd flag {f} is not known to this check"))
            }
            f => name = Some(f),
        }
    }
    let name = name.ok_or("useradd without a user name")?;
    let home = stage.absolute(home.unwrap_or(&format!("/home/{name}")));
    if create_home {
        create(&stage.resolve(&home))?;
    }
    stage.users.insert(name.to_string(), home);
    Ok(())
}
