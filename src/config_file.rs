//! `--config <file>`: a subcommand's flags from a TOML file.
//!
//! Each key is a flag's long name (`mqtt-listen = "0.0.0.0:1883"`,
//! `max-packet-size = 1048576`, `allow-anonymous-remote = true`; `_` may
//! stand for `-`). What the file says is turned into flags before clap
//! parses the command line, so it is checked exactly as a flag would be,
//! and every flag has a key without a list to keep in step. A flag given
//! on the command line, or its environment variable, wins over the file.
//! A key that is no flag of the subcommand is an error naming it: a typo
//! must not be silently ignored.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use clap::{Arg, ArgAction, Command};

/// The argument id of the option naming the file.
const CONFIG: &str = "config";

/// `argv` with the flags the subcommand's `--config` file (or its
/// environment variable) sets, placed right after the subcommand, where
/// the command line and the environment do not set them already.
pub fn apply(argv: Vec<OsString>, cli: &Command) -> anyhow::Result<Vec<OsString>> {
    let Some(sub_at) = argv.iter().skip(1).position(|a| !is_flag(a)).map(|i| i + 1) else {
        return Ok(argv);
    };
    let Some(sub) = argv[sub_at]
        .to_str()
        .and_then(|name| cli.find_subcommand(name))
    else {
        return Ok(argv);
    };
    let Some(config_arg) = sub.get_arguments().find(|a| a.get_id() == CONFIG) else {
        return Ok(argv);
    };
    let given = &argv[sub_at + 1..];
    let Some(path) = config_path(given, config_arg) else {
        return Ok(argv);
    };
    let flags = flags_from(&path, sub, given)?;
    let mut out = argv[..=sub_at].to_vec();
    out.extend(flags);
    out.extend_from_slice(given);
    Ok(out)
}

fn is_flag(arg: &OsString) -> bool {
    arg.to_str().is_some_and(|a| a.starts_with('-'))
}

/// The file named by `--config FILE`, `--config=FILE` or the option's
/// environment variable.
fn config_path(given: &[OsString], arg: &Arg) -> Option<PathBuf> {
    let long = format!("--{}", arg.get_long()?);
    let mut it = given.iter();
    while let Some(a) = it.next() {
        let Some(s) = a.to_str() else { continue };
        if s == "--" {
            break;
        }
        if s == long {
            return it.next().map(PathBuf::from);
        }
        if let Some(v) = s.strip_prefix(&format!("{long}=")) {
            return Some(PathBuf::from(v));
        }
    }
    let env = arg.get_env()?;
    std::env::var_os(env).map(PathBuf::from)
}

/// True if the command line names this flag (`--name` or `--name=…`).
fn on_command_line(given: &[OsString], long: &str) -> bool {
    let flag = format!("--{long}");
    given.iter().filter_map(|a| a.to_str()).any(|a| {
        a == flag
            || a.strip_prefix(flag.as_str())
                .is_some_and(|rest| rest.starts_with('='))
    })
}

fn flags_from(path: &Path, sub: &Command, given: &[OsString]) -> anyhow::Result<Vec<OsString>> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read the config file {}", path.display()))?;
    let table: toml::Table = toml::from_str(&text)
        .with_context(|| format!("config file {} is not valid TOML", path.display()))?;
    let mut flags = Vec::new();
    for (key, value) in &table {
        let long = key.replace('_', "-");
        let Some(arg) = sub
            .get_arguments()
            .find(|a| a.get_long() == Some(long.as_str()) && a.get_id() != CONFIG)
        else {
            bail!(
                "config file {}: unknown key `{key}`; the keys are the long flags of `axion {} --help`",
                path.display(),
                sub.get_name()
            );
        };
        let from_env = arg
            .get_env()
            .is_some_and(|env| std::env::var_os(env).is_some());
        if on_command_line(given, &long) || from_env {
            continue;
        }
        let flag = format!("--{long}");
        match (value, arg.get_action()) {
            (toml::Value::Boolean(on), ArgAction::SetTrue) => {
                if *on {
                    flags.push(OsString::from(flag));
                }
            }
            (toml::Value::Boolean(_), _) | (_, ArgAction::SetTrue) => bail!(
                "config file {}: `{key}` is {}",
                path.display(),
                if matches!(arg.get_action(), ArgAction::SetTrue) {
                    "a switch: true or false"
                } else {
                    "not a switch: give it a value"
                }
            ),
            (toml::Value::Array(items), ArgAction::Append) => {
                for item in items {
                    flags.push(OsString::from(format!(
                        "{flag}={}",
                        scalar(path, key, item)?
                    )));
                }
            }
            (value, _) => flags.push(OsString::from(format!(
                "{flag}={}",
                scalar(path, key, value)?
            ))),
        }
    }
    Ok(flags)
}

/// A key's value as the flag's text.
fn scalar(path: &Path, key: &str, value: &toml::Value) -> anyhow::Result<String> {
    Ok(match value {
        toml::Value::String(s) => s.clone(),
        toml::Value::Integer(n) => n.to_string(),
        toml::Value::Float(x) => x.to_string(),
        other => bail!(
            "config file {}: `{key}` takes a string or a number, not {}",
            path.display(),
            other.type_str()
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser, Debug)]
    struct Cli {
        #[command(subcommand)]
        cmd: Sub,
    }

    #[derive(clap::Subcommand, Debug)]
    enum Sub {
        Serve(ServeArgs),
    }

    #[derive(clap::Args, Debug)]
    struct ServeArgs {
        #[arg(long, env = "AXION_TEST_CONFIG_FILE")]
        config: Option<PathBuf>,
        #[arg(long, env = "AXION_TEST_CONFIG_LISTEN", default_value = "127.0.0.1:1")]
        listen: String,
        #[arg(long, default_value_t = 1)]
        max_packet_size: u64,
        #[arg(long)]
        open: bool,
    }

    fn parse(file: &str, extra: &[&str]) -> anyhow::Result<ServeArgs> {
        use clap::CommandFactory;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("axion.toml");
        std::fs::write(&path, file).unwrap();
        let mut argv: Vec<OsString> = vec![
            "axion".into(),
            "serve".into(),
            "--config".into(),
            path.into(),
        ];
        argv.extend(extra.iter().map(OsString::from));
        let argv = apply(argv, &Cli::command())?;
        let Sub::Serve(args) = Cli::try_parse_from(argv)?.cmd;
        Ok(args)
    }

    #[test]
    fn keys_become_flags_and_the_command_line_wins() {
        let args = parse(
            "listen = \"0.0.0.0:9\"\nmax_packet_size = 2048\nopen = true\n",
            &[],
        )
        .unwrap();
        assert_eq!(args.listen, "0.0.0.0:9");
        assert_eq!(args.max_packet_size, 2048);
        assert!(args.open);
        let args = parse("listen = \"0.0.0.0:9\"\n", &["--listen", "10.0.0.1:2"]).unwrap();
        assert_eq!(args.listen, "10.0.0.1:2");
        let args = parse("open = false\n", &[]).unwrap();
        assert!(!args.open);
    }

    #[test]
    fn an_unknown_key_or_a_wrong_type_is_an_error_naming_it() {
        let err = parse("lisen = \"x\"\n", &[]).unwrap_err().to_string();
        assert!(err.contains("unknown key `lisen`"), "{err}");
        let err = parse("open = \"yes\"\n", &[]).unwrap_err().to_string();
        assert!(err.contains("`open` is a switch"), "{err}");
        let err = format!(
            "{:#}",
            parse("max-packet-size = \"big\"\n", &[]).unwrap_err()
        );
        assert!(err.contains("big"), "{err}");
        let err = format!("{:#}", parse("listen = [\n", &[]).unwrap_err());
        assert!(err.contains("not valid TOML"), "{err}");
    }
}
