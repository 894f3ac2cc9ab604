//! Request parsing that answers 400 with the offending field named: JSON bodies (syntax,
//! unknown fields, wrong types) and query strings (unknown or malformed parameters).

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use serde::de::DeserializeOwned;

use crate::error::ApiError;

/// Largest accepted JSON body; the biggest legitimate one (a full config) is a few KiB.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A JSON body whose parse errors name the field (`policy.activation_interval`,
/// `identity.epids`, `body` for a syntax error).
pub struct ApiJson<T>(pub T);

impl<T, S> FromRequest<S> for ApiJson<T>
where
    T: DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = Bytes::from_request(req, state)
            .await
            .map_err(|e| ApiError::invalid("body", format!("cannot read the request body: {e}")))?;
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses `bytes` as `T`, naming the field that failed.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    parse_json_limited(bytes, MAX_BODY_BYTES)
}

/// [`parse_json`] with another size limit (the catalog is larger than other bodies).
pub fn parse_json_limited<T: DeserializeOwned>(bytes: &[u8], max: usize) -> Result<T, ApiError> {
    if bytes.len() > max {
        return Err(ApiError::invalid(
            "body",
            format!("body larger than {max} bytes"),
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        ApiError::invalid(field_of(&path, &inner), clean_message(&inner))
    })?;
    de.end().map_err(|e| {
        ApiError::invalid("body", format!("trailing data after the JSON value: {e}"))
    })?;
    Ok(value)
}

/// The field a serde error is about: the error's path, extended by the name in
/// "unknown field `x`" / "missing field `x`" messages (whose path is the parent object).
fn field_of(path: &str, error: &serde_json::Error) -> String {
    use serde_json::error::Category;
    if matches!(error.classify(), Category::Syntax | Category::Eof) {
        return "body".to_owned();
    }
    let message = error.to_string();
    let named = ["unknown field `", "missing field `"]
        .iter()
        .find_map(|prefix| {
            let rest = message.split_once(prefix)?.1;
            Some(rest.split_once('`')?.0.to_owned())
        });
    let parent = if path == "." { "" } else { path };
    // For unknown fields the path already ends with the name; for missing ones it does not.
    if let Some(name) = &named {
        if parent == name || parent.ends_with(&format!(".{name}")) {
            return parent.to_owned();
        }
    }
    match (parent, named) {
        ("", Some(name)) => name,
        (p, Some(name)) => format!("{p}.{name}"),
        ("", None) => "body".to_owned(),
        (p, None) => p.to_owned(),
    }
}

/// serde_json's message without the " at line 1 column 9" suffix.
fn clean_message(error: &serde_json::Error) -> String {
    let message = error.to_string();
    match message.rsplit_once(" at line ") {
        Some((head, _)) => head.to_owned(),
        None => message,
    }
}

/// A parsed query string; every parameter must be taken, so an unknown one is a 400.
pub struct QueryParams {
    pairs: Vec<(String, String)>,
}

impl QueryParams {
    pub fn parse(raw: Option<&str>) -> Result<Self, ApiError> {
        let pairs: Vec<(String, String)> = match raw {
            None | Some("") => Vec::new(),
            Some(q) => serde_urlencoded::from_str(q)
                .map_err(|e| ApiError::invalid("query", format!("malformed query string: {e}")))?,
        };
        let mut seen: Vec<&str> = Vec::new();
        for (k, _) in &pairs {
            if seen.contains(&k.as_str()) {
                return Err(ApiError::invalid(k.clone(), "given more than once"));
            }
            seen.push(k);
        }
        Ok(Self { pairs })
    }

    /// Removes and returns parameter `name` (empty values count as absent).
    pub fn take(&mut self, name: &str) -> Option<String> {
        let i = self.pairs.iter().position(|(k, _)| k == name)?;
        let (_, v) = self.pairs.swap_remove(i);
        (!v.is_empty()).then_some(v)
    }

    /// Removes `name` and parses it with `FromStr`.
    pub fn take_parsed<T: std::str::FromStr>(&mut self, name: &str) -> Result<Option<T>, ApiError>
    where
        T::Err: std::fmt::Display,
    {
        match self.take(name) {
            None => Ok(None),
            Some(v) => v
                .parse()
                .map(Some)
                .map_err(|e| ApiError::invalid(name, format!("{v:?}: {e}"))),
        }
    }

    /// Fails on the first parameter nobody took.
    pub fn finish(self) -> Result<(), ApiError> {
        match self.pairs.into_iter().next() {
            None => Ok(()),
            Some((k, _)) => Err(ApiError::invalid(k, "unknown query parameter")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Inner {
        a: u32,
    }

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Outer {
        inner: Option<Inner>,
        b: Option<String>,
    }

    fn field(body: &str) -> String {
        match parse_json::<Outer>(body.as_bytes()) {
            Err(ApiError::Invalid { field, .. }) => field,
            other => panic!("expected a 400, got {other:?}"),
        }
    }

    #[test]
    fn json_errors_name_the_field() {
        assert_eq!(field("{"), "body");
        assert_eq!(field("not json"), "body");
        assert_eq!(field(r#"{"c": 1}"#), "c");
        assert_eq!(field(r#"{"inner": {"a": 1, "zz": 2}}"#), "inner.zz");
        assert_eq!(field(r#"{"inner": {"a": "x"}}"#), "inner.a");
        assert_eq!(field(r#"{"inner": {}}"#), "inner.a");
        assert_eq!(field(r#"{"b": 5}"#), "b");
        assert_eq!(field(r#"{} {}"#), "body");
        assert!(parse_json::<Outer>(br#"{"inner": {"a": 3}}"#).is_ok());
    }

    #[test]
    fn query_params_reject_unknown_duplicate_and_malformed() {
        let mut q = QueryParams::parse(Some("limit=5&offset=x")).unwrap();
        assert_eq!(q.take_parsed::<usize>("limit").unwrap(), Some(5));
        match q.take_parsed::<usize>("offset") {
            Err(ApiError::Invalid { field, .. }) => assert_eq!(field, "offset"),
            other => panic!("{other:?}"),
        }
        let mut q = QueryParams::parse(Some("limit=5&bogus=1")).unwrap();
        let _ = q.take("limit");
        match q.finish() {
            Err(ApiError::Invalid { field, .. }) => assert_eq!(field, "bogus"),
            other => panic!("{other:?}"),
        }
        match QueryParams::parse(Some("a=1&a=2")) {
            Err(ApiError::Invalid { field, .. }) => assert_eq!(field, "a"),
            Ok(_) => panic!("duplicate accepted"),
            Err(e) => panic!("{e:?}"),
        }
        let mut q = QueryParams::parse(Some("search=")).unwrap();
        assert_eq!(q.take("search"), None);
        assert!(q.finish().is_ok());
    }
}
