use std::process::ExitCode;

use service_kit::config::parse_or_exit;
use subscription_gateway::settings::Cli;
use subscription_gateway::startup::Application;

#[actix_web::main]
async fn main() -> ExitCode {
    let cli: Cli = parse_or_exit();
    if let Err(err) = service_kit::telemetry::init(&cli.settings.log, "subscription-gateway") {
        err.exit();
    }
    let app = match Application::build(cli.settings).await {
        Ok(app) => app,
        Err(err) => return err.exit(),
    };
    let result = app.run_until_stopped(service_kit::shutdown::signal()).await;
    service_kit::telemetry::shutdown();
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
