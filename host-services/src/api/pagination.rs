//! Lambda's pagination of List calls: `MaxItems` and `Marker` in the
//! query, `NextMarker` in the answer while more remain.
//!
//! A marker names the last item of its page by the item's listing key (a
//! string that sorts in the listing's order), so a page after an item
//! that was deleted meanwhile still starts where it should.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;

use crate::error::ApiError;

/// The page a caller asked for.
#[derive(Debug, Default, Clone, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PageQuery {
    pub marker: Option<String>,
    pub max_items: Option<String>,
}

/// What a List call allows, as Lambda documents it: `MaxItems` up to
/// `most`, and at most `per_page` items in one answer whatever it says.
#[derive(Debug, Clone, Copy)]
pub struct PageLimit {
    pub most: usize,
    pub per_page: usize,
}

/// ListFunctions, ListVersionsByFunction, ListAliases.
pub const LONG_LISTS: PageLimit = PageLimit {
    most: 10_000,
    per_page: 50,
};
/// ListLayerVersions, ListProvisionedConcurrencyConfigs.
pub const SHORT_LISTS: PageLimit = PageLimit {
    most: 50,
    per_page: 50,
};

/// The page of `items` (already in listing order, each keyed by `key`)
/// that `query` asks for, and the marker of the next page if there is one.
pub fn page<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> String,
    query: &PageQuery,
    limit: PageLimit,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    let size = match &query.max_items {
        None => limit.per_page,
        Some(text) => match text.parse::<usize>() {
            Ok(n) if (1..=limit.most).contains(&n) => n.min(limit.per_page),
            _ => {
                return Err(ApiError::invalid(format!(
                    "MaxItems {text:?}: expected a number from 1 to {}",
                    limit.most
                )))
            }
        },
    };
    let after = match &query.marker {
        None => None,
        Some(marker) => Some(
            URL_SAFE_NO_PAD
                .decode(marker)
                .ok()
                .and_then(|bytes| String::from_utf8(bytes).ok())
                .ok_or_else(|| {
                    ApiError::invalid(format!("Marker {marker:?} is not one this API gave"))
                })?,
        ),
    };
    let mut rest = items
        .into_iter()
        .filter(|item| after.as_ref().is_none_or(|a| key(item) > *a));
    let page: Vec<T> = rest.by_ref().take(size).collect();
    let next = match (rest.next(), page.last()) {
        (Some(_), Some(last)) => Some(URL_SAFE_NO_PAD.encode(key(last))),
        _ => None,
    };
    Ok((page, next))
}

/// A listing key for version numbers, `$LATEST` (0) first.
pub fn version_key(version: u64) -> String {
    format!("{version:020}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(max: Option<&str>, marker: Option<&str>) -> PageQuery {
        PageQuery {
            max_items: max.map(String::from),
            marker: marker.map(String::from),
        }
    }

    #[test]
    fn pages_follow_each_other_to_the_end_without_gaps_or_repeats() {
        let items: Vec<u32> = (0..7).collect();
        let key = |n: &u32| format!("{n:03}");
        let mut seen = Vec::new();
        let mut marker = None;
        loop {
            let (got, next) = page(
                items.clone(),
                key,
                &query(Some("3"), marker.as_deref()),
                SHORT_LISTS,
            )
            .unwrap();
            assert!(got.len() <= 3);
            seen.extend(got);
            match next {
                Some(m) => marker = Some(m),
                None => break,
            }
        }
        assert_eq!(seen, items);
        // Exactly a page's worth: no marker to an empty page.
        let (got, next) = page(
            items[..3].to_vec(),
            key,
            &query(Some("3"), None),
            SHORT_LISTS,
        )
        .unwrap();
        assert_eq!((got.len(), next), (3, None));
    }

    #[test]
    fn a_page_after_a_deleted_item_starts_where_it_was() {
        let key = |n: &u32| format!("{n:03}");
        let (_, next) = page(vec![1, 2, 3, 4], key, &query(Some("2"), None), SHORT_LISTS).unwrap();
        let (got, _) = page(
            vec![1, 3, 4],
            key,
            &query(Some("2"), next.as_deref()),
            SHORT_LISTS,
        )
        .unwrap();
        assert_eq!(got, vec![3, 4]);
    }

    #[test]
    fn the_default_page_is_the_limit_and_bad_input_is_named() {
        let items: Vec<u32> = (0..60).collect();
        let key = |n: &u32| format!("{n:03}");
        let (got, next) = page(items.clone(), key, &PageQuery::default(), SHORT_LISTS).unwrap();
        assert_eq!(got.len(), 50);
        assert!(next.is_some());
        let (got, _) = page(items.clone(), key, &query(Some("10000"), None), LONG_LISTS).unwrap();
        assert_eq!(got.len(), 50, "a page holds 50 at most");
        for bad in ["0", "51", "-1", "many"] {
            let e = page(items.clone(), key, &query(Some(bad), None), SHORT_LISTS).unwrap_err();
            assert!(e.to_string().contains("MaxItems"), "{e}");
        }
        let e = page(items, key, &query(None, Some("%%%")), SHORT_LISTS).unwrap_err();
        assert!(e.to_string().contains("Marker"), "{e}");
    }
}
