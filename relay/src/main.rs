use botrelay::config::{Config, StoreKind};
use clap::Parser;
use std::process::ExitCode;

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> ExitCode {
    without_huge_pages();
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

/// Turns the kernel's transparent huge pages off for the relay. The
/// allocator asks for them on its arenas; the kernel then backs whole 2 MiB
/// pages of which the relay touched a part, and fills in more of them in the
/// background (khugepaged, every 10 s), so an idle relay's RSS grew by a
/// third minutes after its load ended (74 to 100 MB), past what its memory
/// limit was sized for. Done before anything much is allocated; a kernel
/// without the setting leaves things as they are.
fn without_huge_pages() {
    #[cfg(target_os = "linux")]
    // SAFETY: prctl with PR_SET_THP_DISABLE takes integer arguments only and
    // changes nothing but this process's huge page setting.
    unsafe {
        libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0);
    }
}
