//! Conditional requests (RFC 9110, section 13): `If-Match` and `If-None-Match` over a
//! configuration's version.
//!
//! A configuration's entity tag is its version, `"N"`; `"0"` is the state "nothing stored"
//! (what `GET` answers for a user with no configuration). `*` stands for "a configuration is
//! stored". `If-Match` compares strongly (a weak tag `W/"N"` never matches), `If-None-Match`
//! weakly. A tag this service never gave (`"x"`) is valid and matches nothing; a header that is
//! not a list of entity tags is a 400.
//!
//! The preconditions are checked against the database, never a cache: a write names the one
//! version they let through as the compare-and-set's expected version, so the database itself
//! refuses it if the configuration moved on (see `api.rs`).

use axum::http::{HeaderMap, HeaderName, header};
use utoipa::IntoParams;

use super::error::ApiError;

/// The two fields as the OpenAPI document describes them (`Preconditions::read` reads them).
#[derive(IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // a description for the OpenAPI document, never built
pub(crate) struct PreconditionHeaders {
    /// Only if the stored version is one of these strong tags (`"N"`), or `*`: one is stored.
    #[param(
        rename = "If-Match",
        pattern = r#"^[ \t]*(\*|((W/)?"[!#-~]*")?([ \t]*,[ \t]*((W/)?"[!#-~]*")?)*)[ \t]*$"#
    )]
    if_match: Option<String>,
    /// Only if the stored version is none of these tags (weak comparison), or `*`: none is
    /// stored.
    #[param(
        rename = "If-None-Match",
        pattern = r#"^[ \t]*(\*|((W/)?"[!#-~]*")?([ \t]*,[ \t]*((W/)?"[!#-~]*")?)*)[ \t]*$"#
    )]
    if_none_match: Option<String>,
}

/// An `If-Match` or `If-None-Match` field: `*` or a list of entity tags.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Tags {
    Any,
    List(Vec<Tag>),
}

/// One entity tag: weak or strong, and the version it names (`None`: a tag this service never
/// gave, which matches nothing).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tag {
    weak: bool,
    version: Option<u64>,
}

/// What a request's preconditions decide for the version stored now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Verdict {
    /// Go on.
    Proceed,
    /// `If-None-Match` matched on a `GET` or `HEAD`: 304.
    NotModified,
    /// 412.
    Failed,
}

/// A request's `If-Match` and `If-None-Match`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Preconditions {
    if_match: Option<Tags>,
    if_none_match: Option<Tags>,
}

impl Preconditions {
    /// The request's preconditions; a malformed field is a 400 (before any I/O).
    pub(crate) fn read(headers: &HeaderMap) -> Result<Preconditions, ApiError> {
        Ok(Preconditions {
            if_match: field(headers, &header::IF_MATCH)?,
            if_none_match: field(headers, &header::IF_NONE_MATCH)?,
        })
    }

    /// No precondition was given.
    pub(crate) fn is_empty(&self) -> bool {
        self.if_match.is_none() && self.if_none_match.is_none()
    }

    /// RFC 9110 section 13.2.2's order, for the version stored now (0: none is stored):
    /// `If-Match` first (412 if it fails), then `If-None-Match` (304 for a read, 412 for a
    /// change, if it matches).
    pub(crate) fn verdict(&self, version: u64, read: bool) -> Verdict {
        if let Some(tags) = &self.if_match
            && !tags.matches(version, false)
        {
            return Verdict::Failed;
        }
        if let Some(tags) = &self.if_none_match
            && tags.matches(version, true)
        {
            return if read {
                Verdict::NotModified
            } else {
                Verdict::Failed
            };
        }
        Verdict::Proceed
    }

    /// Whether a change may proceed at `version`.
    pub(crate) fn allow(&self, version: u64) -> bool {
        self.verdict(version, false) == Verdict::Proceed
    }

    /// The one version a change can proceed at, when the preconditions leave only one
    /// (`If-Match: "N"`, or `If-None-Match: *`: nothing stored): the write can name it without
    /// reading first.
    pub(crate) fn pinned(&self) -> Option<u64> {
        let candidate = match (&self.if_match, &self.if_none_match) {
            (Some(Tags::List(tags)), _) => {
                let mut strong = tags.iter().filter(|t| !t.weak).filter_map(|t| t.version);
                let first = strong.next()?;
                strong.all(|v| v == first).then_some(first)?
            }
            (_, Some(Tags::Any)) => 0,
            _ => return None,
        };
        // Both fields must let it through (`If-Match: "3"` with `If-None-Match: "3"`: none).
        self.allow(candidate).then_some(candidate)
    }
}

impl Tags {
    /// RFC 9110's comparison: `*` matches a stored configuration; a list, one of its tags
    /// (weakly: a weak tag matches too; strongly: only a strong one).
    fn matches(&self, version: u64, weak: bool) -> bool {
        match self {
            Tags::Any => version > 0,
            Tags::List(tags) => tags
                .iter()
                .any(|t| (weak || !t.weak) && t.version == Some(version)),
        }
    }
}

/// A field's value (every line of it, as one list), or `None` without the field.
fn field(headers: &HeaderMap, name: &HeaderName) -> Result<Option<Tags>, ApiError> {
    let mut lines = headers.get_all(name).iter().peekable();
    if lines.peek().is_none() {
        return Ok(None);
    }
    let mut any = false;
    let mut tags = Vec::new();
    for line in lines {
        let text = line.to_str().map_err(|_| malformed(name))?;
        if text.trim() == "*" {
            any = true;
        } else {
            parse_list(text, &mut tags).ok_or_else(|| malformed(name))?;
        }
    }
    match (any, tags.is_empty()) {
        (true, true) => Ok(Some(Tags::Any)),
        // `*` with tags, or an empty field: not a valid field.
        (true, false) => Err(malformed(name)),
        (false, _) => Ok(Some(Tags::List(tags))),
    }
}

/// `#entity-tag`: `[W/]"…"`, separated by commas and spaces. RFC 9110's list syntax lets a
/// list be empty (an empty field): then no tag matches, so an empty `If-Match` fails and an
/// empty `If-None-Match` lets the request through.
fn parse_list(text: &str, tags: &mut Vec<Tag>) -> Option<()> {
    let mut rest = text;
    loop {
        // An element (perhaps empty), then the end or a comma: `OWS [tag] OWS ("," | end)`.
        rest = rest.trim_start_matches([' ', '\t']);
        if rest.is_empty() {
            return Some(());
        }
        if let Some(after) = rest.strip_prefix(',') {
            rest = after;
            continue;
        }
        let (weak, quoted) = match rest.strip_prefix("W/") {
            Some(quoted) => (true, quoted),
            None => (false, rest),
        };
        let opaque = quoted.strip_prefix('"')?;
        let end = opaque.find('"')?;
        let inner = &opaque[..end];
        // etagc: visible characters but `"` (obs-text cannot reach here: the field is ASCII).
        if inner.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return None;
        }
        // Only the digits of a version this service gave: "007" and "+7" are not "7".
        let version = (inner.bytes().all(|b| b.is_ascii_digit())
            && !(inner.len() > 1 && inner.starts_with('0')))
        .then(|| inner.parse::<u64>().ok())
        .flatten();
        tags.push(Tag { weak, version });
        rest = opaque[end + 1..].trim_start_matches([' ', '\t']);
        if rest.is_empty() {
            return Some(());
        }
        rest = rest.strip_prefix(',')?;
    }
}

fn malformed(name: &HeaderName) -> ApiError {
    ApiError::bad_request(format!(
        "{name} must be * or a list of entity tags as this service gives them in ETag (\"N\")"
    ))
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn with(pairs: &[(&HeaderName, &'static str)]) -> Result<Preconditions, ApiError> {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(*name, HeaderValue::from_static(value));
        }
        Preconditions::read(&headers)
    }

    fn if_match(value: &'static str) -> Preconditions {
        with(&[(&header::IF_MATCH, value)]).unwrap()
    }

    fn if_none_match(value: &'static str) -> Preconditions {
        with(&[(&header::IF_NONE_MATCH, value)]).unwrap()
    }

    #[test]
    fn if_match_compares_strongly() {
        let p = if_match("\"7\"");
        assert!(p.allow(7));
        assert!(!p.allow(8));
        assert!(!p.allow(0));
        assert_eq!(p.pinned(), Some(7));
        let weak = if_match("W/\"7\"");
        assert!(!weak.allow(7), "a weak tag never matches If-Match");
        assert_eq!(weak.pinned(), None);
        let list = if_match("\"3\", W/\"7\",\"9\"");
        assert!(list.allow(3) && list.allow(9));
        assert!(!list.allow(7));
        assert_eq!(list.pinned(), None, "two versions pass");
        let unknown = if_match("\"x\"");
        assert!(!unknown.allow(0) && !unknown.allow(1));
        assert_eq!(if_match("\"0\"").pinned(), Some(0), "create only");
    }

    #[test]
    fn a_star_means_a_configuration_is_stored() {
        let p = if_match("*");
        assert!(p.allow(1) && !p.allow(0));
        assert_eq!(p.pinned(), None);
        let create_only = if_none_match("*");
        assert!(create_only.allow(0) && !create_only.allow(4));
        assert_eq!(create_only.pinned(), Some(0));
        assert_eq!(create_only.verdict(4, true), Verdict::NotModified);
    }

    #[test]
    fn if_none_match_compares_weakly_and_is_304_only_for_reads() {
        let p = if_none_match("W/\"5\", \"6\"");
        assert_eq!(p.verdict(5, true), Verdict::NotModified);
        assert_eq!(p.verdict(6, true), Verdict::NotModified);
        assert_eq!(p.verdict(6, false), Verdict::Failed);
        assert_eq!(p.verdict(7, true), Verdict::Proceed);
        assert_eq!(p.pinned(), None);
    }

    #[test]
    fn if_match_is_checked_before_if_none_match() {
        let p = with(&[
            (&header::IF_MATCH, "\"2\""),
            (&header::IF_NONE_MATCH, "\"2\""),
        ])
        .unwrap();
        assert_eq!(p.verdict(2, true), Verdict::NotModified);
        assert_eq!(p.verdict(3, true), Verdict::Failed, "If-Match failed first");
        assert_eq!(p.pinned(), None, "nothing can pass a change");
    }

    #[test]
    fn an_empty_list_matches_nothing() {
        for empty in ["", " , "] {
            let p = with(&[(&header::IF_MATCH, empty)]).unwrap();
            assert!(!p.allow(0) && !p.allow(3), "If-Match: {empty:?} fails");
            let p = with(&[(&header::IF_NONE_MATCH, empty)]).unwrap();
            assert!(p.allow(0) && p.allow(3), "If-None-Match: {empty:?} holds");
            assert_eq!(p.verdict(3, true), Verdict::Proceed);
        }
    }

    #[test]
    fn fields_on_several_lines_are_one_list() {
        let p = with(&[(&header::IF_MATCH, "\"1\""), (&header::IF_MATCH, "\"2\"")]).unwrap();
        assert!(p.allow(1) && p.allow(2) && !p.allow(3));
        assert!(with(&[]).unwrap().is_empty());
    }

    #[test]
    fn malformed_fields_are_refused() {
        for bad in [
            "7", "\"7", "W/7", "\"7\"x", "*, \"7\"", "\"a b\"", "w/\"7\"",
        ] {
            assert!(
                with(&[(&header::IF_MATCH, bad)]).is_err(),
                "If-Match: {bad:?}"
            );
        }
        for odd in ["\"007\"", "\"+7\"", "\"-1\"", "\"99999999999999999999999\""] {
            let p = if_match(odd);
            assert!(!p.allow(7) && !p.allow(1), "{odd} names no version");
        }
    }
}
