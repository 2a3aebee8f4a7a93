use clap::Parser;
use vipo::cli::{Cli, Command};

fn main() -> anyhow::Result<()> {
    vipo::cli::keep_freed_memory();
    let cli = Cli::parse();
    match &cli.command {
        Command::Devices(a) => vipo::cli::devices::run(a, &cli.device)?,
        Command::Bench(a) => vipo::cli::bench::run(a, &cli.device)?,
        Command::Sample(a) => vipo::cli::sample::run(a, &cli.device)?,
        Command::Data(a) => vipo::cli::data::run(a, &cli.device)?,
        Command::Train(a) => vipo::cli::train::run(a, &cli.device)?,
        Command::Demo(a) => vipo::cli::demo::run(a, &cli.device)?,
        Command::World(a) => vipo::cli::world::run(a, &cli.device)?,
    }
    Ok(())
}
