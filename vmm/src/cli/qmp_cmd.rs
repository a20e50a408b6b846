//! `ferry qmp PATH COMMAND [JSON]`: a thin QMP client.

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use serde_json::{Map, Value};

use crate::qmp::{writer::to_qemu_json, ClientError, QmpClient};

/// Arguments of `ferry qmp`.
#[derive(Debug, Args)]
pub struct QmpArgs {
    /// The VMM's QMP socket.
    pub socket: PathBuf,
    /// The command, e.g. query-status.
    pub command: String,
    /// The command's arguments as a JSON object, e.g. '{"uri": "tcp:198.18.0.2:4444"}'.
    pub arguments: Option<String>,
    /// Seconds to wait for the reply.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
}

/// Runs `ferry qmp`.
pub fn run(a: QmpArgs) -> i32 {
    let args: Map<String, Value> = match a.arguments.as_deref() {
        None => Map::new(),
        Some(text) => match serde_json::from_str::<Value>(text) {
            Ok(Value::Object(m)) => m,
            Ok(_) => {
                eprintln!("ferry qmp: the arguments must be a JSON object");
                return 2;
            }
            Err(e) => {
                eprintln!("ferry qmp: the arguments are not valid JSON: {e}");
                return 2;
            }
        },
    };
    let mut client = match QmpClient::connect(&a.socket) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("ferry qmp: cannot connect to {}: {e}", a.socket.display());
            return 1;
        }
    };
    client.set_timeout(Duration::from_secs(a.timeout));
    let args = if args.is_empty() {
        None
    } else {
        Some(Value::Object(args))
    };
    match client.execute(&a.command, args) {
        Ok(v) => {
            println!("{}", to_qemu_json(&v));
            0
        }
        Err(ClientError::Command(e)) => {
            eprintln!("error ({}): {}", e.class.as_str(), e.desc);
            1
        }
        Err(e) => {
            eprintln!("ferry qmp: {e}");
            1
        }
    }
}
