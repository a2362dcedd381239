use botrelay::config::Config;
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
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.worker_threads(cpus))
        .enable_all()
        .build()
    {
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
