//! A subscription result serialized once, with its extensions typed: the cursor every member
//! gets, and what one member may be due besides (`recovered` after a resume, `skipped` past
//! capacity), written from the parts the result was built of rather than by editing its text.

use std::borrow::Cow;
use std::sync::Arc;

use juniper::{DefaultScalarValue, ExecutionOutput};

/// `{"data":…,"errors":…,"extensions":{"cursor":…}}`, `errors` left out when empty as the
/// GraphQL response format asks.
#[derive(Debug)]
pub struct ResultText {
    /// The result as most members get it.
    text: Arc<str>,
    /// Where `text`'s `data` and `errors` end: what a member due more extensions shares.
    members_end: usize,
    /// The event behind the result, also the SSE event's `id`.
    cursor: Option<Arc<str>>,
}

/// What a member is told of a result besides its cursor.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Told {
    /// Whether a resume found the history whole: said on the first result after it.
    pub recovered: Option<bool>,
    /// Results this one supersedes (a state subscription past capacity).
    pub skipped: u64,
}

#[derive(serde::Serialize)]
struct Extensions<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    cursor: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    recovered: Option<bool>,
    #[serde(skip_serializing_if = "is_zero")]
    skipped: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

impl ResultText {
    pub fn new(output: &ExecutionOutput<DefaultScalarValue>, cursor: Option<Arc<str>>) -> Self {
        Self::build(cursor, |text| {
            text.extend_from_slice(br#""data":"#);
            serde_json::to_writer(&mut *text, &output.data)?;
            if !output.errors.is_empty() {
                text.extend_from_slice(br#","errors":"#);
                serde_json::to_writer(&mut *text, &output.errors)?;
            }
            Ok(())
        })
    }

    /// A result of `data` alone.
    #[cfg(test)]
    pub fn of_data(data: &serde_json::Value, cursor: Option<Arc<str>>) -> Self {
        Self::build(cursor, |text| {
            text.extend_from_slice(br#""data":"#);
            serde_json::to_writer(&mut *text, data)
        })
    }

    fn build(
        cursor: Option<Arc<str>>,
        members: impl FnOnce(&mut Vec<u8>) -> serde_json::Result<()>,
    ) -> Self {
        let mut text = Vec::with_capacity(256);
        text.push(b'{');
        if members(&mut text).is_err() {
            text.truncate(1);
            text.extend_from_slice(br#""data":null"#);
        }
        let members_end = text.len();
        close(&mut text, cursor.as_deref(), Told::default());
        Self {
            text: utf8(text),
            members_end,
            cursor,
        }
    }

    pub fn text(&self) -> &Arc<str> {
        &self.text
    }

    pub fn cursor(&self) -> Option<&Arc<str>> {
        self.cursor.as_ref()
    }

    /// The result as a member who is `told` more gets it.
    pub fn telling(&self, told: Told) -> Cow<'_, str> {
        if told == Told::default() {
            return Cow::Borrowed(&self.text);
        }
        let mut text = Vec::with_capacity(self.text.len() + 32);
        text.extend_from_slice(&self.text.as_bytes()[..self.members_end]);
        close(&mut text, self.cursor.as_deref(), told);
        Cow::Owned(utf8(text).to_string())
    }
}

/// Writes the extensions, if there are any, and the closing brace.
fn close(text: &mut Vec<u8>, cursor: Option<&str>, told: Told) {
    if cursor.is_some() || told != Told::default() {
        let extensions = Extensions {
            cursor,
            recovered: told.recovered,
            skipped: told.skipped,
        };
        text.extend_from_slice(br#","extensions":"#);
        // A struct of strings, a bool and a number: it serializes.
        let _ = serde_json::to_writer(&mut *text, &extensions);
    }
    text.push(b'}');
}

/// serde_json writes UTF-8, and the pieces are cut at its boundaries.
fn utf8(bytes: Vec<u8>) -> Arc<str> {
    Arc::from(String::from_utf8(bytes).unwrap_or_else(|_| r#"{"data":null}"#.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extensions_are_written_from_their_parts() {
        let result = ResultText::of_data(&serde_json::json!({"n": 1}), Some(Arc::from("c")));
        assert_eq!(
            &**result.text(),
            r#"{"data":{"n":1},"extensions":{"cursor":"c"}}"#
        );
        let told = Told {
            recovered: Some(true),
            skipped: 3,
        };
        assert_eq!(
            result.telling(told),
            r#"{"data":{"n":1},"extensions":{"cursor":"c","recovered":true,"skipped":3}}"#
        );
        let bare = ResultText::of_data(&serde_json::json!(null), None);
        assert_eq!(&**bare.text(), r#"{"data":null}"#);
        assert_eq!(
            bare.telling(Told {
                recovered: Some(false),
                skipped: 0
            }),
            r#"{"data":null,"extensions":{"recovered":false}}"#
        );
    }
}
