//! `quantfleet node`: the inference node (crates/quantfleet-node). Configuration errors are reported before
//! anything is loaded, naming the offending field or flag.

use std::process::ExitCode;

use anyhow::Result;

pub type Args = quantfleet_node::NodeArgs;

pub fn run(args: Args) -> Result<ExitCode> {
    let settings = match quantfleet_node::NodeSettings::resolve(&args) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("error: invalid node configuration: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    let result = runtime.block_on(quantfleet_node::run(settings));
    // A signal during the load returns while the loader thread is still quantizing: dropping the runtime would
    // wait for that thread, so leave it behind (the process exits now). After a drain nothing is left running.
    runtime.shutdown_background();
    result?;
    Ok(ExitCode::SUCCESS)
}
