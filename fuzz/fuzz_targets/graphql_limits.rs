//! Protects the GraphQL document limits (`graphql_schema::schema` with `DocumentLimits`,
//! enforced by juniper's parser before validation): no document panics or overflows the stack
//! while being parsed and validated (libFuzzer's -timeout catches blow-ups), and a document that
//! got past the parser nests `{`/`[` no deeper than `max_depth` and has no more than
//! `max_tokens` tokens, counted by a scan of our own. The walks the services run on a document
//! before validation (`operation_field_count` for the batch budget, `inspect`
//! for the one-root-field rule) finish quickly and, as they claim, count within the field limit
//! the parser enforced. `max_depth` is the production default; the token limit is small.
#![no_main]

use std::sync::OnceLock;

use graphql_schema::{schema, DocumentLimits, Schema};
use juniper::{GraphQLError, ValidatedOperation};
use libfuzzer_sys::fuzz_target;

const LIMITS: DocumentLimits = DocumentLimits {
    max_depth: 24,
    max_fields: 50,
    max_tokens: 500,
};

fuzz_target!(|data: &[u8]| {
    static SCHEMA: OnceLock<Schema> = OnceLock::new();
    let schema = SCHEMA.get_or_init(|| schema(LIMITS));
    let text = String::from_utf8_lossy(data);
    // As the services do: a variable of an unknown type is refused before juniper's validation,
    // which panics on one that has a default value (found by this target).
    let parsed = match graphql_schema::unknown_variable_type(schema, &text) {
        Some(_) => true,
        None => !matches!(
            ValidatedOperation::new(&text, None, schema),
            Err(GraphQLError::ParseError(_))
        ),
    };
    if parsed {
        let (depth, tokens) = scan(&text);
        assert!(
            depth <= LIMITS.max_depth,
            "parsed a document nesting {depth} deep"
        );
        assert!(
            tokens <= LIMITS.max_tokens,
            "parsed a document of at least {tokens} tokens"
        );
    }
    if let Some(count) = graphql_schema::operation_field_count(schema, &text, None) {
        assert!(count <= LIMITS.max_fields, "operation_field_count {count}");
    }
    if let Some(fields) = graphql_schema::inspect(schema, &text, None).root_fields {
        assert!(
            fields.count <= LIMITS.max_fields,
            "{} root fields",
            fields.count
        );
    }
});

/// Deepest nesting of `{` and `[`, and a lower bound of the token count (each punctuator, each
/// string, each maximal run of name and number characters is at least one token), outside
/// strings and comments as juniper's lexer delimits them.
fn scan(text: &str) -> (usize, usize) {
    let bytes = text.as_bytes();
    let (mut depth, mut deepest, mut tokens, mut in_run) = (0usize, 0, 0, false);
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        let run_char = b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-' | b'+');
        if run_char && !in_run {
            tokens += 1;
        }
        in_run = run_char;
        match b {
            b'{' | b'[' => {
                depth += 1;
                deepest = deepest.max(depth);
                tokens += 1;
            }
            b'}' | b']' => {
                depth = depth.saturating_sub(1);
                tokens += 1;
            }
            b'(' | b')' | b':' | b'=' | b'@' | b'$' | b'!' | b'|' => tokens += 1,
            b'#' => {
                while i < bytes.len() && !matches!(bytes[i], b'\n' | b'\r') {
                    i += 1;
                }
            }
            b'"' if bytes[i..].starts_with(b"\"\"\"") => {
                // Block string: ends at three quotes, the first not after a backslash.
                tokens += 1;
                let (mut quotes, mut escaped) = (0, false);
                i += 3;
                while i < bytes.len() {
                    match bytes[i] {
                        b'\\' => (quotes, escaped) = (0, true),
                        b'"' if escaped => (quotes, escaped) = (0, false),
                        b'"' if quotes == 2 => break,
                        b'"' => quotes += 1,
                        _ => (quotes, escaped) = (0, false),
                    }
                    i += 1;
                }
            }
            b'"' => {
                tokens += 1;
                i += 1;
                while i < bytes.len() && bytes[i] != b'"' {
                    i += if bytes[i] == b'\\' { 2 } else { 1 };
                }
            }
            _ => {}
        }
        i += 1;
    }
    (deepest, tokens)
}
