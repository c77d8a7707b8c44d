//! `axion passwd`: the argon2 hash line for a password or bridge token, to
//! paste into the auth file (no plain secrets on disk).

use std::io::BufRead;
use std::process::ExitCode;

use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Password to hash; read from the first line of stdin when absent (keeps it out of shell history).
    #[arg(long, env = "AXION_PASSWORD")]
    pub password: Option<String>,
    /// Generate a random bridge token for USER instead: prints the token (`USER.<secret>`) and its hash.
    #[arg(long, env = "AXION_TOKEN_FOR", value_name = "USER")]
    pub token_for: Option<String>,
}

pub fn run(args: Args) -> anyhow::Result<ExitCode> {
    if let Some(user) = args.token_for {
        axion_wire::topics::validate_level("user", &user)?;
        let secret = axion_access::auth::random_secret();
        let hash = axion_access::auth::hash_password(&secret)?;
        println!("token = \"{user}.{secret}\"");
        println!("tokens = [\"{hash}\"]");
        return Ok(ExitCode::SUCCESS);
    }
    let password = match args.password {
        Some(p) => p,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .lock()
                .read_line(&mut line)
                .context("read the password from stdin")?;
            line.trim_end_matches(['\r', '\n']).to_string()
        }
    };
    anyhow::ensure!(!password.is_empty(), "empty password");
    println!(
        "password = \"{}\"",
        axion_access::auth::hash_password(&password)?
    );
    Ok(ExitCode::SUCCESS)
}
