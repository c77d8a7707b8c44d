//! One module per subcommand: flags in, library calls out.

pub mod serve;
