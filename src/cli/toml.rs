//! A config file section as a subcommand's command line: each key is the
//! subcommand's long option, so a section accepts exactly what the command
//! line accepts and is checked by the same clap definition.

use std::any::TypeId;

use anyhow::{anyhow, bail, Result};
use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{Arg, ArgAction, Args, Command};
use toml::{Table, Value};

use crate::cli::{OutputArgs, PortList};

/// Parses a datapath section with its subcommand's clap definition.
pub fn section_args<A: Args>(label: &str, table: &Table) -> Result<A> {
    let command = A::augment_args(
        Command::new("section")
            .no_binary_name(true)
            .disable_help_flag(true),
    );
    let argv = command_line(label, &command, table)?;
    let matches = command
        .try_get_matches_from(argv)
        .map_err(|err| anyhow!("{label} {}", clap_error(&err)))?;
    A::from_arg_matches(&matches).map_err(|err| anyhow!("{label} {}", clap_error(&err)))
}

/// The TOML type a key takes, from its clap argument.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A flag: `true` gives `--key`, `false` nothing.
    Flag,
    Integer,
    String,
    /// A comma-separated port list on the command line, an array here.
    Ports,
}

fn kind(arg: &Arg) -> Kind {
    let parsed = arg.get_value_parser().type_id();
    let integers = [
        TypeId::of::<u8>(),
        TypeId::of::<u16>(),
        TypeId::of::<u32>(),
        TypeId::of::<u64>(),
    ];
    if matches!(arg.get_action(), ArgAction::SetTrue) {
        Kind::Flag
    } else if parsed == TypeId::of::<PortList>() {
        Kind::Ports
    } else if integers.iter().any(|integer| parsed == *integer) {
        Kind::Integer
    } else {
        Kind::String
    }
}

/// The keys that would repeat in every section but belong to the whole service.
fn service_wide_keys() -> Vec<String> {
    let output = OutputArgs::augment_args(Command::new("output"));
    output
        .get_arguments()
        .filter_map(|arg| arg.get_long().map(str::to_owned))
        .collect()
}

/// The section as the subcommand's arguments: `--key=value` each.
fn command_line(label: &str, command: &Command, table: &Table) -> Result<Vec<String>> {
    let service_wide = service_wide_keys();
    let mut argv = Vec::new();
    for (key, value) in table {
        if service_wide.contains(key) {
            bail!(
                "{label} {key}: applies to the whole service; set it under [metrics] \
                 or on the run command line"
            );
        }
        let Some(arg) = command
            .get_arguments()
            .find(|arg| arg.get_long() == Some(key))
        else {
            let dashed = key.replace('_', "-");
            if dashed != *key
                && command
                    .get_arguments()
                    .any(|a| a.get_long() == Some(&dashed))
            {
                bail!("{label} unknown key '{key}'; keys are written with dashes: '{dashed}'");
            }
            bail!("{label} unknown key '{key}'");
        };
        let kind = kind(arg);
        let repeatable = matches!(arg.get_action(), ArgAction::Append);
        let values: Vec<String> = match (value, kind) {
            (Value::Boolean(true), Kind::Flag) => {
                argv.push(format!("--{key}"));
                continue;
            }
            (Value::Boolean(false), Kind::Flag) => continue,
            (Value::Array(items), Kind::Ports) => {
                let ports = items
                    .iter()
                    .map(|item| scalar(item, Kind::Integer))
                    .collect::<Result<Vec<_>, _>>();
                vec![ports
                    .map_err(|err| anyhow!("{label} {key}: {err}"))?
                    .join(",")]
            }
            (Value::Array(items), _) if repeatable => items
                .iter()
                .map(|item| scalar(item, kind))
                .collect::<Result<_, _>>()
                .map_err(|err| anyhow!("{label} {key}: {err}"))?,
            (Value::Integer(_), Kind::Ports) => vec![scalar(value, Kind::Integer)?],
            _ => vec![scalar(value, kind).map_err(|err| anyhow!("{label} {key}: {err}"))?],
        };
        // `--key=value`, so that a value starting with '-' stays a value.
        argv.extend(values.into_iter().map(|value| format!("--{key}={value}")));
    }
    Ok(argv)
}

/// One value as command-line text, if it has the type the key takes.
fn scalar(value: &Value, kind: Kind) -> Result<String> {
    match (kind, value) {
        (Kind::Integer, Value::Integer(number)) => Ok(number.to_string()),
        (Kind::String, Value::String(text)) => Ok(text.clone()),
        (Kind::Integer, _) => bail!("expected an integer, got {}", type_name(value)),
        (Kind::String, _) => bail!("expected a string, got {}", type_name(value)),
        (Kind::Flag, _) => bail!("expected true or false, got {}", type_name(value)),
        (Kind::Ports, _) => bail!(
            "expected a list of ports such as [80, 443], got {}",
            type_name(value)
        ),
    }
}

pub fn type_name(value: &Value) -> &'static str {
    match value {
        Value::String(_) => "a string",
        Value::Integer(_) => "an integer",
        Value::Float(_) => "a float",
        Value::Boolean(_) => "a boolean",
        Value::Datetime(_) => "a date",
        Value::Array(_) => "an array",
        Value::Table(_) => "a table",
    }
}

/// clap's error as `key: what is wrong`, in the file's terms.
fn clap_error(err: &clap::Error) -> String {
    // clap names arguments as `--key <VALUE>`.
    let key_of = |text: &str| {
        let name = text.split_whitespace().next().unwrap_or(text);
        name.trim_start_matches('-').to_owned()
    };
    let keys: Vec<String> = match err.get(ContextKind::InvalidArg) {
        Some(ContextValue::String(arg)) => vec![key_of(arg)],
        Some(ContextValue::Strings(args)) => args.iter().map(|arg| key_of(arg)).collect(),
        _ => Vec::new(),
    };
    let value = match err.get(ContextKind::InvalidValue) {
        Some(ContextValue::String(value)) => value.clone(),
        _ => String::new(),
    };
    match err.kind() {
        ErrorKind::MissingRequiredArgument => {
            let quoted: Vec<String> = keys.iter().map(|key| format!("'{key}'")).collect();
            format!("missing key {}", quoted.join(", "))
        }
        ErrorKind::ValueValidation => {
            let source = std::error::Error::source(err);
            // The standard library's parse errors do not quote the value.
            let bare = source.is_some_and(|source| {
                source.is::<std::num::ParseIntError>() || source.is::<std::net::AddrParseError>()
            });
            match source {
                Some(source) if !bare => format!("{}: {source}", keys.join(", ")),
                Some(source) => format!("{}: invalid value '{value}': {source}", keys.join(", ")),
                None => format!("{}: invalid value '{value}'", keys.join(", ")),
            }
        }
        ErrorKind::InvalidValue => {
            let valid = match err.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(valid)) => format!("; one of {}", valid.join(", ")),
                _ => String::new(),
            };
            format!("{}: invalid value '{value}'{valid}", keys.join(", "))
        }
        _ => {
            let rendered = err.render().to_string();
            let first = rendered.lines().next().unwrap_or("invalid value");
            let message = first.strip_prefix("error: ").unwrap_or(first);
            if keys.is_empty() {
                message.to_owned()
            } else {
                format!("{}: {message}", keys.join(", "))
            }
        }
    }
}
