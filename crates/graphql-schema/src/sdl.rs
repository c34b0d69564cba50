//! The schema printed as GraphQL SDL.

use std::fmt::Write as _;

use tokens::auth::AuthError;

use crate::{schema, Context, DocumentLimits};

/// The schema in GraphQL SDL, printed from introspection: types sorted by name, fields in
/// declaration order. `schema.graphql` at the repository root holds this text; a test compares.
pub fn sdl() -> String {
    let schema = schema(DocumentLimits::default());
    let context = Context::new(Err(AuthError::MissingHeader));
    let (value, _errors) =
        match juniper::introspect(&schema, &context, juniper::IntrospectionFormat::All) {
            Ok(result) => result,
            Err(err) => return format!("# introspection failed: {err}\n"),
        };
    let json = serde_json::to_value(&value).unwrap_or_default();
    print_sdl(&json["__schema"])
}

fn print_sdl(schema: &serde_json::Value) -> String {
    use serde_json::Value as J;
    let name_of = |v: &J, key: &str| v[key]["name"].as_str().map(str::to_owned);
    let mut out = String::new();
    let _ = writeln!(out, "schema {{");
    for (kind, key) in [
        ("query", "queryType"),
        ("mutation", "mutationType"),
        ("subscription", "subscriptionType"),
    ] {
        if let Some(name) = name_of(schema, key) {
            let _ = writeln!(out, "  {kind}: {name}");
        }
    }
    let _ = writeln!(out, "}}");
    let mut types: Vec<&J> = schema["types"]
        .as_array()
        .map(|types| types.iter().collect())
        .unwrap_or_default();
    types.sort_by_key(|t| t["name"].as_str().unwrap_or_default().to_owned());
    for ty in types {
        let name = ty["name"].as_str().unwrap_or_default();
        let kind = ty["kind"].as_str().unwrap_or_default();
        if name.starts_with("__")
            || (kind == "SCALAR" && ["String", "Int", "Float", "Boolean", "ID"].contains(&name))
        {
            continue;
        }
        out.push('\n');
        description(&mut out, &ty["description"], "");
        match kind {
            "SCALAR" => {
                let _ = writeln!(out, "scalar {name}");
            }
            "ENUM" => {
                let _ = writeln!(out, "enum {name} {{");
                for value in ty["enumValues"].as_array().into_iter().flatten() {
                    description(&mut out, &value["description"], "  ");
                    let _ = writeln!(out, "  {}", value["name"].as_str().unwrap_or_default());
                }
                let _ = writeln!(out, "}}");
            }
            "UNION" => {
                let members: Vec<&str> = ty["possibleTypes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|t| t["name"].as_str())
                    .collect();
                let _ = writeln!(out, "union {name} = {}", members.join(" | "));
            }
            "INPUT_OBJECT" => {
                let _ = writeln!(out, "input {name} {{");
                for field in ty["inputFields"].as_array().into_iter().flatten() {
                    description(&mut out, &field["description"], "  ");
                    let _ = writeln!(out, "  {}", input_value(field));
                }
                let _ = writeln!(out, "}}");
            }
            _ => object_type(&mut out, ty, name, kind),
        }
    }
    out
}

/// An object or interface type, with its fields.
fn object_type(out: &mut String, ty: &serde_json::Value, name: &str, kind: &str) {
    let keyword = if kind == "INTERFACE" {
        "interface"
    } else {
        "type"
    };
    let interfaces: Vec<&str> = ty["interfaces"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["name"].as_str())
        .collect();
    let implements = if interfaces.is_empty() {
        String::new()
    } else {
        format!(" implements {}", interfaces.join(" & "))
    };
    let _ = writeln!(out, "{keyword} {name}{implements} {{");
    for field in ty["fields"].as_array().into_iter().flatten() {
        field_line(out, field);
    }
    let _ = writeln!(out, "}}");
}

/// One field of an object or interface type: its description, arguments, type and deprecation.
fn field_line(out: &mut String, field: &serde_json::Value) {
    description(out, &field["description"], "  ");
    let args: Vec<String> = field["args"]
        .as_array()
        .into_iter()
        .flatten()
        .map(input_value)
        .collect();
    let args = if args.is_empty() {
        String::new()
    } else {
        format!("({})", args.join(", "))
    };
    let deprecated = if field["isDeprecated"].as_bool() == Some(true) {
        format!(
            " @deprecated(reason: {})",
            serde_json::Value::from(
                field["deprecationReason"]
                    .as_str()
                    .unwrap_or("No longer supported")
            )
        )
    } else {
        String::new()
    };
    let _ = writeln!(
        out,
        "  {}{args}: {}{deprecated}",
        field["name"].as_str().unwrap_or_default(),
        type_ref(&field["type"])
    );
}

fn description(out: &mut String, description: &serde_json::Value, indent: &str) {
    if let Some(text) = description.as_str().filter(|t| !t.is_empty()) {
        let _ = writeln!(out, "{indent}\"\"\"");
        for line in text.lines() {
            let _ = writeln!(out, "{indent}{line}");
        }
        let _ = writeln!(out, "{indent}\"\"\"");
    }
}

fn input_value(value: &serde_json::Value) -> String {
    let mut text = format!(
        "{}: {}",
        value["name"].as_str().unwrap_or_default(),
        type_ref(&value["type"])
    );
    if let Some(default) = value["defaultValue"].as_str() {
        let _ = write!(text, " = {default}");
    }
    text
}

fn type_ref(ty: &serde_json::Value) -> String {
    match ty["kind"].as_str() {
        Some("NON_NULL") => format!("{}!", type_ref(&ty["ofType"])),
        Some("LIST") => format!("[{}]", type_ref(&ty["ofType"])),
        _ => ty["name"].as_str().unwrap_or_default().to_owned(),
    }
}
