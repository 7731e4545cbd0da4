//! `quantfleet plan`: the fit planner from the command line.

use anyhow::Result;
use std::process::ExitCode;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args) -> Result<ExitCode> {
    anyhow::bail!("plan is not implemented yet")
}
