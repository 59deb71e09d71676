//! The `UserConfig` model, after the original platform's JSON Schema
//! (`schema/*.yaml` in this crate, vendored from the design we were given).
//!
//! * Every field has a default and every section is optional on input, as on the original
//!   platform ("missing sections were filled with defaults").
//! * Fields this version does not know are kept in `extra` maps at every level and written back
//!   unchanged, so that a read-modify-write by an older service never drops a newer one's data.
//! * `UserConfig`'s `Debug` shows the user id only, never a value, and the storage layer never
//!   logs a value.

use std::fmt;

use serde::Serialize;
use serde::de::{self, Deserialize, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};

/// Fields a section (or the top level) does not know, kept as they were read.
pub type Extra = Map<String, Value>;

/// The nil UUID: the default for model profile ids ("no profile chosen").
pub const NIL_PROFILE_ID: &str = "00000000-0000-0000-0000-000000000000";

/// `Deserialize` for a section that keeps the fields it does not know in its `extra` map.
///
/// What `#[serde(default)]` with a `#[serde(flatten)] extra` map would derive, without
/// flatten's cost: a derived flatten buffers every field of the section into serde's
/// intermediate `Content` tree before decoding it again (about half of a `UserConfig`'s decode
/// time, measured in `benches/tiers.rs`, group `codec`). Here each known field decodes
/// straight into its type, each unknown one into a JSON [`Value`]; a missing field takes the
/// section's default, a repeated known field is an error (as derived).
macro_rules! keep_unknown_fields {
    ($ty:ident { $($field:ident),+ $(,)? }) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                #[allow(non_camel_case_types)]
                enum Field {
                    $($field,)+
                    Unknown(String),
                }

                struct FieldVisitor;

                impl<'de> Visitor<'de> for FieldVisitor {
                    type Value = Field;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str("a field name")
                    }

                    fn visit_str<E: de::Error>(self, name: &str) -> Result<Field, E> {
                        Ok(match name {
                            $(stringify!($field) => Field::$field,)+
                            other => Field::Unknown(other.to_owned()),
                        })
                    }

                    fn visit_string<E: de::Error>(self, name: String) -> Result<Field, E> {
                        Ok(match name.as_str() {
                            $(stringify!($field) => Field::$field,)+
                            _ => Field::Unknown(name),
                        })
                    }

                    fn visit_bytes<E: de::Error>(self, name: &[u8]) -> Result<Field, E> {
                        match std::str::from_utf8(name) {
                            Ok(name) => self.visit_str(name),
                            Err(_) => Err(E::custom("a field name is not UTF-8")),
                        }
                    }
                }

                impl<'de> Deserialize<'de> for Field {
                    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                        d.deserialize_identifier(FieldVisitor)
                    }
                }

                struct SectionVisitor;

                impl<'de> Visitor<'de> for SectionVisitor {
                    type Value = $ty;

                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        f.write_str(concat!("a map of ", stringify!($ty), "'s fields"))
                    }

                    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<$ty, A::Error> {
                        $(let mut $field = None;)+
                        let mut extra = Extra::new();
                        while let Some(key) = map.next_key::<Field>()? {
                            match key {
                                $(Field::$field => {
                                    if $field.is_some() {
                                        return Err(de::Error::duplicate_field(stringify!($field)));
                                    }
                                    $field = Some(map.next_value_seed(FieldSeed(std::marker::PhantomData))?);
                                })+
                                Field::Unknown(name) => {
                                    let value: Value = map.next_value()?;
                                    extra.insert(name, value);
                                }
                            }
                        }
                        // Built only if a field is missing (stored configurations have all).
                        let mut defaults: Option<$ty> = None;
                        Ok($ty {
                            $($field: match $field {
                                Some(value) => value,
                                None => std::mem::take(
                                    &mut defaults.get_or_insert_with(<$ty>::default).$field,
                                ),
                            },)+
                            extra,
                        })
                    }
                }

                deserializer.deserialize_map(SectionVisitor)
            }
        }
    };
}

/// How a known field decodes: as its type's `Deserialize`, but an integer also from a number
/// with no fraction (`423.0`), as JSON Schema counts integers (and the original platform's
/// models accepted them).
trait FieldValue: Sized {
    fn decode<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error>;
}

macro_rules! field_as_deserialize {
    ($($ty:ty),+) => {$(
        impl FieldValue for $ty {
            fn decode<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                <$ty>::deserialize(deserializer)
            }
        }
    )+};
}

field_as_deserialize!(
    bool,
    f64,
    String,
    SummarizationConfig,
    MemoryConfig,
    WebSearchConfig,
    PreferencesConfig,
    ModelProfileConfig,
    RefinementConfig,
    ImageGenerationConfig
);

impl FieldValue for i64 {
    fn decode<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Integer;

        impl Visitor<'_> for Integer {
            type Value = i64;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an integer")
            }

            fn visit_i64<E: de::Error>(self, v: i64) -> Result<i64, E> {
                Ok(v)
            }

            fn visit_u64<E: de::Error>(self, v: u64) -> Result<i64, E> {
                i64::try_from(v).map_err(|_| E::invalid_value(de::Unexpected::Unsigned(v), &self))
            }

            fn visit_f64<E: de::Error>(self, v: f64) -> Result<i64, E> {
                // No fraction, and under 2^53: from there on a float is already rounded (an
                // integer literal past i64's range arrives here as the nearest float, which
                // must not pass for i64::MIN or i64::MAX).
                const SAFE: f64 = 9_007_199_254_740_992.0;
                if v.fract() == 0.0 && v.abs() < SAFE {
                    #[allow(clippy::cast_possible_truncation)]
                    Ok(v as i64)
                } else {
                    Err(E::invalid_value(de::Unexpected::Float(v), &self))
                }
            }
        }

        deserializer.deserialize_any(Integer)
    }
}

/// A known field's value, through [`FieldValue`].
struct FieldSeed<T>(std::marker::PhantomData<T>);

impl<'de, T: FieldValue> de::DeserializeSeed<'de> for FieldSeed<T> {
    type Value = T;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<T, D::Error> {
        T::decode(deserializer)
    }
}

keep_unknown_fields!(UserConfig {
    user_id,
    summarization,
    memory,
    web_search,
    preferences,
    model_profiles,
    refinement,
    image_generation
});
keep_unknown_fields!(SummarizationConfig {
    enabled,
    messages_before_summary,
    summaries_before_consolidation,
    embedding_model,
    embedding_dimension,
    max_summary_levels,
    summary_weight_coefficient
});
keep_unknown_fields!(MemoryConfig {
    enabled,
    limit,
    profile_id,
    enable_cross_user,
    enable_cross_conversation,
    similarity_threshold,
    always_retrieve
});
keep_unknown_fields!(WebSearchConfig {
    enabled,
    auto_detect,
    max_results,
    include_results
});
keep_unknown_fields!(PreferencesConfig {
    default_profile_id,
    theme,
    font_size,
    notifications_on,
    language
});
keep_unknown_fields!(ModelProfileConfig {
    primary_profile_id,
    summarization_profile_id,
    master_summary_profile_id,
    brief_summary_profile_id,
    key_points_profile_id,
    improvement_profile_id,
    analysis_profile_id,
    memory_retrieval_profile_id,
    self_critique_profile_id,
    research_task_profile_id,
    research_plan_profile_id,
    research_consolidation_profile_id,
    research_analysis_profile_id,
    embedding_profile_id,
    formatting_profile_id,
    image_generation_prompt_profile_id,
    image_generation_profile_id
});
keep_unknown_fields!(RefinementConfig {
    enable_response_filtering,
    enable_response_critique
});
keep_unknown_fields!(ImageGenerationConfig {
    enabled,
    storage_directory,
    max_image_size,
    retention_hours,
    auto_prompt_refinement,
    width,
    height,
    inference_steps,
    guidance_scale,
    low_memory_mode,
    negative_prompt
});

/// A user's configuration (schema `UserConfig`).
///
/// `Debug` shows the user id and the unknown fields' names, never a value: configurations may
/// hold private data and must not reach logs. Print a section to see its values.
#[derive(Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[cfg_attr(
    feature = "openapi",
    schema(
        description = "A user's configuration: every section and field optional on input \
        (defaults fill them), unknown fields kept at every level"
    )
)]
#[serde(default)]
pub struct UserConfig {
    /// The user's id (the only required field of the schema).
    // Set by the storage from the user it is stored for; a body naming another is refused.
    #[cfg_attr(feature = "openapi", schema(read_only))]
    pub user_id: String,
    /// Conversation summarization settings.
    pub summarization: SummarizationConfig,
    /// Memory retrieval settings.
    pub memory: MemoryConfig,
    /// Web search settings.
    pub web_search: WebSearchConfig,
    /// User preferences.
    pub preferences: PreferencesConfig,
    /// Model profile configuration.
    pub model_profiles: ModelProfileConfig,
    /// Response refinement settings.
    pub refinement: RefinementConfig,
    /// Image generation configuration.
    pub image_generation: ImageGenerationConfig,
    /// Fields this version does not know, kept for the round trip.
    #[serde(flatten)]
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = std::collections::HashMap<String, serde_json::Value>)
    )]
    pub extra: Extra,
}

impl Default for UserConfig {
    fn default() -> Self {
        UserConfig {
            user_id: String::new(),
            summarization: SummarizationConfig::default(),
            memory: MemoryConfig::default(),
            web_search: WebSearchConfig::default(),
            preferences: PreferencesConfig::default(),
            model_profiles: ModelProfileConfig::default(),
            refinement: RefinementConfig::default(),
            image_generation: ImageGenerationConfig::default(),
            extra: Extra::new(),
        }
    }
}

impl std::fmt::Debug for UserConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UserConfig")
            .field("user_id", &self.user_id)
            .field("unknown_fields", &self.extra.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

impl UserConfig {
    /// The default configuration of `user_id` (what an unknown user gets).
    #[must_use]
    pub fn default_for(user_id: impl Into<String>) -> Self {
        UserConfig {
            user_id: user_id.into(),
            ..UserConfig::default()
        }
    }

    /// Checks the ranges the schema gives; the first violation, as a message naming the field.
    pub fn check(&self) -> Result<(), String> {
        let img = &self.image_generation;
        if !(128..=4096).contains(&img.max_image_size) {
            return Err(format!(
                "image_generation.max_image_size must be between 128 and 4096, got {}",
                img.max_image_size
            ));
        }
        if !(1..=720).contains(&img.retention_hours) {
            return Err(format!(
                "image_generation.retention_hours must be between 1 and 720, got {}",
                img.retention_hours
            ));
        }
        let finite = [
            (
                "summarization.summary_weight_coefficient",
                self.summarization.summary_weight_coefficient,
            ),
            (
                "memory.similarity_threshold",
                self.memory.similarity_threshold,
            ),
            ("image_generation.guidance_scale", img.guidance_scale),
        ];
        for (field, value) in finite {
            if !value.is_finite() {
                return Err(format!("{field} must be a finite number"));
            }
        }
        Ok(())
    }
}

/// Conversation summarization settings (schema `SummarizationConfig`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct SummarizationConfig {
    /// Whether summarization is enabled.
    pub enabled: bool,
    /// Number of messages before a summary.
    pub messages_before_summary: i64,
    /// Number of summaries before consolidation.
    pub summaries_before_consolidation: i64,
    /// Embedding model (listed as required by the schema, without a type; a name).
    pub embedding_model: String,
    /// Embedding dimension.
    pub embedding_dimension: i64,
    /// Maximum summary levels.
    pub max_summary_levels: i64,
    /// Summary weight coefficient.
    pub summary_weight_coefficient: f64,
    /// Fields this version does not know.
    #[serde(flatten)]
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = std::collections::HashMap<String, serde_json::Value>)
    )]
    pub extra: Extra,
}

impl Default for SummarizationConfig {
    fn default() -> Self {
        SummarizationConfig {
            enabled: true,
            messages_before_summary: 6,
            summaries_before_consolidation: 3,
            embedding_model: "nomic-embed-text".to_owned(),
            embedding_dimension: 768,
            max_summary_levels: 3,
            summary_weight_coefficient: 0.5,
            extra: Extra::new(),
        }
    }
}

/// Memory retrieval settings (schema `MemoryConfig`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct MemoryConfig {
    /// Whether memory retrieval is enabled.
    pub enabled: bool,
    /// Retrieval limit.
    pub limit: i64,
    /// Profile used for retrieval (listed as required by the schema, without a type; an id).
    pub profile_id: String,
    /// Enable cross-user retrieval.
    pub enable_cross_user: bool,
    /// Enable cross-conversation retrieval.
    pub enable_cross_conversation: bool,
    /// Similarity threshold.
    pub similarity_threshold: f64,
    /// Always retrieve.
    pub always_retrieve: bool,
    /// Fields this version does not know.
    #[serde(flatten)]
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = std::collections::HashMap<String, serde_json::Value>)
    )]
    pub extra: Extra,
}

impl Default for MemoryConfig {
    fn default() -> Self {
        MemoryConfig {
            enabled: true,
            limit: 5,
            profile_id: NIL_PROFILE_ID.to_owned(),
            enable_cross_user: false,
            enable_cross_conversation: true,
            similarity_threshold: 0.7,
            always_retrieve: false,
            extra: Extra::new(),
        }
    }
}

/// Web search settings (schema `WebSearchConfig`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct WebSearchConfig {
    /// Whether web search is enabled.
    pub enabled: bool,
    /// Auto-detect web search.
    pub auto_detect: bool,
    /// Maximum number of results.
    pub max_results: i64,
    /// Include results in the response.
    pub include_results: bool,
    /// Fields this version does not know.
    #[serde(flatten)]
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = std::collections::HashMap<String, serde_json::Value>)
    )]
    pub extra: Extra,
}

impl Default for WebSearchConfig {
    fn default() -> Self {
        WebSearchConfig {
            enabled: false,
            auto_detect: true,
            max_results: 5,
            include_results: true,
            extra: Extra::new(),
        }
    }
}

/// User preferences (schema `PreferencesConfig`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct PreferencesConfig {
    /// Default profile id.
    pub default_profile_id: String,
    /// Theme.
    pub theme: String,
    /// Font size.
    pub font_size: i64,
    /// Notifications enabled.
    pub notifications_on: bool,
    /// Language.
    pub language: String,
    /// Fields this version does not know.
    #[serde(flatten)]
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = std::collections::HashMap<String, serde_json::Value>)
    )]
    pub extra: Extra,
}

impl Default for PreferencesConfig {
    fn default() -> Self {
        PreferencesConfig {
            default_profile_id: NIL_PROFILE_ID.to_owned(),
            theme: "system".to_owned(),
            font_size: 14,
            notifications_on: true,
            language: "en".to_owned(),
            extra: Extra::new(),
        }
    }
}

/// Which model profile serves each task (schema `ModelProfileConfig`); ids are UUIDs.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
#[allow(missing_docs)] // each field is "<task> profile id", as in the schema
pub struct ModelProfileConfig {
    pub primary_profile_id: String,
    pub summarization_profile_id: String,
    pub master_summary_profile_id: String,
    pub brief_summary_profile_id: String,
    pub key_points_profile_id: String,
    pub improvement_profile_id: String,
    pub analysis_profile_id: String,
    pub memory_retrieval_profile_id: String,
    pub self_critique_profile_id: String,
    pub research_task_profile_id: String,
    pub research_plan_profile_id: String,
    pub research_consolidation_profile_id: String,
    pub research_analysis_profile_id: String,
    pub embedding_profile_id: String,
    pub formatting_profile_id: String,
    pub image_generation_prompt_profile_id: String,
    pub image_generation_profile_id: String,
    /// Fields this version does not know.
    #[serde(flatten)]
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = std::collections::HashMap<String, serde_json::Value>)
    )]
    pub extra: Extra,
}

impl Default for ModelProfileConfig {
    fn default() -> Self {
        let nil = || NIL_PROFILE_ID.to_owned();
        ModelProfileConfig {
            primary_profile_id: nil(),
            summarization_profile_id: nil(),
            master_summary_profile_id: nil(),
            brief_summary_profile_id: nil(),
            key_points_profile_id: nil(),
            improvement_profile_id: nil(),
            analysis_profile_id: nil(),
            memory_retrieval_profile_id: nil(),
            self_critique_profile_id: nil(),
            research_task_profile_id: nil(),
            research_plan_profile_id: nil(),
            research_consolidation_profile_id: nil(),
            research_analysis_profile_id: nil(),
            embedding_profile_id: nil(),
            formatting_profile_id: nil(),
            image_generation_prompt_profile_id: nil(),
            image_generation_profile_id: nil(),
            extra: Extra::new(),
        }
    }
}

/// Response refinement settings (schema `RefinementConfig`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct RefinementConfig {
    /// Enable response filtering.
    pub enable_response_filtering: bool,
    /// Enable response critique.
    pub enable_response_critique: bool,
    /// Fields this version does not know.
    #[serde(flatten)]
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = std::collections::HashMap<String, serde_json::Value>)
    )]
    pub extra: Extra,
}

impl Default for RefinementConfig {
    fn default() -> Self {
        RefinementConfig {
            enable_response_filtering: false,
            enable_response_critique: false,
            extra: Extra::new(),
        }
    }
}

/// Image generation configuration (schema `ImageGenerationConfig`).
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "openapi", derive(utoipa::ToSchema))]
#[serde(default)]
pub struct ImageGenerationConfig {
    /// Whether image generation is enabled.
    pub enabled: bool,
    /// Directory for file storage.
    pub storage_directory: String,
    /// Largest width or height of a generated image, in pixels (128 to 4096).
    #[cfg_attr(feature = "openapi", schema(minimum = 128, maximum = 4096))]
    pub max_image_size: i64,
    /// How long generated images are kept, in hours (1 to 720).
    #[cfg_attr(feature = "openapi", schema(minimum = 1, maximum = 720))]
    pub retention_hours: i64,
    /// Refine the prompt automatically before generating.
    pub auto_prompt_refinement: bool,
    /// Width of the generated image.
    pub width: i64,
    /// Height of the generated image.
    pub height: i64,
    /// Number of inference steps.
    pub inference_steps: i64,
    /// Guidance scale.
    pub guidance_scale: f64,
    /// Use low memory mode.
    pub low_memory_mode: bool,
    /// Negative prompt.
    pub negative_prompt: String,
    /// Fields this version does not know.
    #[serde(flatten)]
    #[cfg_attr(
        feature = "openapi",
        schema(value_type = std::collections::HashMap<String, serde_json::Value>)
    )]
    pub extra: Extra,
}

impl Default for ImageGenerationConfig {
    fn default() -> Self {
        ImageGenerationConfig {
            enabled: false,
            storage_directory: "images".to_owned(),
            max_image_size: 1024,
            retention_hours: 24,
            auto_prompt_refinement: false,
            width: 1024,
            height: 1024,
            inference_steps: 30,
            guidance_scale: 7.5,
            low_memory_mode: false,
            negative_prompt: String::new(),
            extra: Extra::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn missing_sections_and_fields_get_defaults() {
        let c: UserConfig =
            serde_json::from_value(json!({"user_id": "u1", "preferences": {"theme": "dark"}}))
                .unwrap();
        assert_eq!(c.user_id, "u1");
        assert_eq!(c.preferences.theme, "dark");
        assert_eq!(c.preferences.font_size, 14);
        assert_eq!(c.summarization, SummarizationConfig::default());
        assert!(c.extra.is_empty());
    }

    #[test]
    fn an_integer_may_be_written_with_a_zero_fraction_and_nothing_else() {
        let read = |json: &str| serde_json::from_str::<UserConfig>(json);
        let c = read(r#"{"preferences":{"font_size":18.0},"memory":{"limit":1e2}}"#).unwrap();
        assert_eq!((c.preferences.font_size, c.memory.limit), (18, 100));
        for bad in [
            r#"{"preferences":{"font_size":18.5}}"#,
            r#"{"preferences":{"font_size":1e300}}"#,
            r#"{"preferences":{"font_size":"18"}}"#,
            r#"{"preferences":{"font_size":18446744073709551615}}"#,
        ] {
            assert!(read(bad).is_err(), "{bad}");
        }
        // The edges of i64.
        let c = read(r#"{"preferences":{"font_size":-9223372036854775808}}"#).unwrap();
        assert_eq!(c.preferences.font_size, i64::MIN);
        for past in [
            "9223372036854775808.0",
            "-9223372036854775809",
            "9007199254740993.0",
        ] {
            let json = format!(r#"{{"preferences":{{"font_size":{past}}}}}"#);
            assert!(read(&json).is_err(), "{past}");
        }
    }

    #[test]
    fn unknown_fields_survive_a_round_trip_at_every_level() {
        let input = json!({
            "user_id": "u1",
            "future_section": {"a": [1, 2, 3]},
            "preferences": {"theme": "dark", "accent_colour": "teal"},
            "image_generation": {"sampler": {"name": "euler", "eta": 0.1}},
        });
        let c: UserConfig = serde_json::from_value(input.clone()).unwrap();
        assert_eq!(c.extra["future_section"], input["future_section"]);
        assert_eq!(c.preferences.extra["accent_colour"], "teal");
        let back = serde_json::to_value(&c).unwrap();
        assert_eq!(back["future_section"], input["future_section"]);
        assert_eq!(back["preferences"]["accent_colour"], "teal");
        assert_eq!(back["image_generation"]["sampler"]["name"], "euler");
        // And a second trip changes nothing.
        let again: UserConfig = serde_json::from_value(back.clone()).unwrap();
        assert_eq!(again, c);
    }

    #[test]
    fn repeated_fields_and_wrong_shapes_are_errors() {
        let repeated = r#"{"user_id": "u1", "preferences": {"theme": "a", "theme": "b"}}"#;
        let err = serde_json::from_str::<UserConfig>(repeated).unwrap_err();
        assert!(err.to_string().contains("duplicate field `theme`"), "{err}");
        assert!(serde_json::from_str::<UserConfig>("[1, 2]").is_err());
        assert!(serde_json::from_str::<UserConfig>(r#"{"memory": 5}"#).is_err());
        assert!(serde_json::from_str::<UserConfig>(r#"{"memory": {"limit": "x"}}"#).is_err());
        // A repeated unknown field: the last one wins, as in a JSON object.
        let c: UserConfig = serde_json::from_str(r#"{"x": 1, "x": 2}"#).unwrap();
        assert_eq!(c.extra["x"], 2);
    }

    proptest::proptest! {
        /// Any configuration, with unknown fields of any JSON shape at every level, survives
        /// JSON and MessagePack (with field names, as the Redis tier stores it) unchanged.
        #[test]
        fn configurations_with_unknown_fields_round_trip(
            theme in "[a-z]{0,12}",
            limit in proptest::prelude::any::<i64>(),
            threshold in -1.0e6f64..1.0e6,
            unknown in proptest::collection::vec(("[a-z_]{1,8}", 0u8..8, unknown_value()), 0..6),
        ) {
            let mut c = UserConfig::default_for("u1");
            c.preferences.theme = theme;
            c.memory.limit = limit;
            c.memory.similarity_threshold = threshold;
            for (name, level, value) in unknown {
                let name = format!("zz_{name}"); // never a known field's name
                let extra = match level {
                    0 => &mut c.extra,
                    1 => &mut c.summarization.extra,
                    2 => &mut c.memory.extra,
                    3 => &mut c.web_search.extra,
                    4 => &mut c.preferences.extra,
                    5 => &mut c.model_profiles.extra,
                    6 => &mut c.refinement.extra,
                    _ => &mut c.image_generation.extra,
                };
                extra.insert(name, value);
            }
            let json: UserConfig = serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
            proptest::prop_assert_eq!(&json, &c);
            let bytes = rmp_serde::to_vec_named(&c).unwrap();
            let msgpack: UserConfig = rmp_serde::from_slice(&bytes).unwrap();
            proptest::prop_assert_eq!(&msgpack, &c);
            let value: UserConfig = serde_json::from_value(serde_json::to_value(&c).unwrap()).unwrap();
            proptest::prop_assert_eq!(&value, &c);
        }
    }

    fn unknown_value() -> impl proptest::strategy::Strategy<Value = Value> {
        use proptest::prelude::*;
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            "[ -~]{0,10}".prop_map(Value::from),
        ];
        leaf.prop_recursive(3, 16, 4, |inner| {
            prop_oneof![
                proptest::collection::vec(inner.clone(), 0..4).prop_map(Value::from),
                proptest::collection::btree_map("[a-z]{1,4}", inner, 0..4)
                    .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    #[test]
    fn debug_shows_no_value() {
        let mut c = UserConfig::default_for("u1");
        c.preferences.theme = "private-theme".into();
        c.extra
            .insert("voice".into(), json!({"secret": "private-extra"}));
        let printed = format!("{c:?}");
        assert!(
            printed.contains("u1") && printed.contains("voice"),
            "{printed}"
        );
        assert!(!printed.contains("private"), "{printed}");
    }

    #[test]
    fn schema_ranges_are_checked() {
        let mut c = UserConfig::default_for("u");
        assert!(c.check().is_ok());
        c.image_generation.max_image_size = 64;
        assert!(c.check().unwrap_err().contains("max_image_size"));
        c.image_generation.max_image_size = 512;
        c.image_generation.retention_hours = 0;
        assert!(c.check().unwrap_err().contains("retention_hours"));
        c.image_generation.retention_hours = 1;
        c.memory.similarity_threshold = f64::NAN;
        assert!(c.check().unwrap_err().contains("similarity_threshold"));
    }

    #[test]
    fn every_schema_property_is_a_field() {
        // Field names of each section as serialized, against the schema files' properties.
        let c = serde_json::to_value(UserConfig::default_for("u")).unwrap();
        // The schema files are vendored in the crate (schema/README.md says from where).
        let schema_dir = concat!(env!("CARGO_MANIFEST_DIR"), "/schema");
        let entries = std::fs::read_dir(schema_dir)
            .unwrap_or_else(|e| panic!("schema directory {schema_dir}: {e}"));
        let mut checked = 0;
        for entry in entries {
            let path = entry.unwrap().path();
            if path.extension().is_none_or(|e| e != "yaml") {
                continue;
            }
            let text = std::fs::read_to_string(&path).unwrap();
            let section = match path.file_stem().unwrap().to_str().unwrap() {
                "user_config" => None,
                "summarization_config" => Some("summarization"),
                "memory_config" => Some("memory"),
                "web_search_config" => Some("web_search"),
                "preferences_config" => Some("preferences"),
                "model_profile_config" => Some("model_profiles"),
                "refinement_config" => Some("refinement"),
                "image_generation_config" => Some("image_generation"),
                other => panic!("unexpected schema file {other}"),
            };
            let object = match section {
                Some(s) => &c[s],
                None => &c,
            };
            // Property names are the two-space-indented keys under `properties:`, and the
            // `required:` list items.
            let mut in_props = false;
            for line in text.lines() {
                if line.starts_with("properties:") {
                    in_props = true;
                    continue;
                }
                if !line.starts_with(' ') {
                    in_props = false;
                }
                let name = if in_props && line.starts_with("  ") && !line.starts_with("   ") {
                    line.trim().trim_end_matches(':')
                } else if let Some(item) = line.strip_prefix("  - ") {
                    item.trim()
                } else {
                    continue;
                };
                assert!(
                    object.get(name).is_some(),
                    "{}: property `{name}` has no field",
                    path.display()
                );
                checked += 1;
            }
        }
        assert!(checked > 60, "only {checked} properties checked");
    }
}
