use clap::Parser;

fn main() -> std::process::ExitCode {
    let cli = kmsd::config::Cli::parse();
    let config = match kmsd::config::Config::load(cli) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("kmsd: {e}");
            return std::process::ExitCode::from(2);
        }
    };
    kmsd::node::init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("kmsd: cannot start the async runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(kmsd::node::run(config)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e:#}");
            eprintln!("kmsd: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
