use botrelay::config::{Config, StoreKind};
use clap::Parser;
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    let config = Config::parse();
    if let Err(problem) = config.validate() {
        eprintln!("error: {problem}");
        return ExitCode::from(2);
    }
    if let Err(problem) = botrelay::logging::init(&config.log_level, config.log_format) {
        eprintln!("error: {problem}");
        return ExitCode::from(2);
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let workers = config.worker_threads(cpus);
    // One worker runs on a current-thread runtime, which does the same work
    // with less bookkeeping per task. `--store nats` waits for NATS in place
    // (`block_in_place`), which takes the multi-threaded one.
    let built = if workers == 1 && config.store != StoreKind::Nats {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .enable_all()
            .build()
    };
    let runtime = match built {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(botrelay::app::run(config, botrelay::app::shutdown_signal())) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = format!("{e:#}"), "botrelay stopped");
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
