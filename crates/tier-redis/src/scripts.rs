//! The Lua scripts that apply the version rules inside Redis, atomically.
//!
//! They mirror `tiercache_core::Slot`: a set refuses an entry older than the live entry held,
//! and versions `<=` a tombstone's; an invalidation at `v` leaves a newer entry alone and
//! otherwise writes a tombstone at `max(v, tombstone held)`; a manual invalidation (no version)
//! turns an entry at `n` into a tombstone at `n - 1`. A tombstone lives until its Redis TTL
//! runs out. Stored bytes the scripts cannot parse are treated as absent (and overwritten).

use redis::Script;

/// Parses the envelope header (see `envelope.rs`): the version and whether it is a tombstone,
/// or nil for anything that is not a format-2 envelope. Versions above 2^53 lose precision in
/// Lua's doubles; the source's versions count writes and never get there.
const PARSE: &str = r#"
local function parse(cur)
  if cur and #cur >= 20 and string.sub(cur, 1, 3) == 'TC\2' then
    local v = 0
    for i = 5, 12 do v = v * 256 + string.byte(cur, i) end
    return v, (string.byte(cur, 4) % 2) == 1
  end
  return nil, false
end
"#;

/// KEYS[1]; ARGV: envelope, version, ttl in ms. Returns 1 if stored, 0 if refused.
const SET: &str = r#"
local cur = redis.call('GET', KEYS[1])
local held, tomb = parse(cur)
local new = tonumber(ARGV[2])
if held ~= nil then
  if tomb then
    if new <= held then return 0 end
  elseif new < held then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[3])
return 1
"#;

/// KEYS[1]; ARGV: version ('' for a manual invalidation), tombstone ttl in ms.
/// Returns 1 if something changed.
const INVALIDATE: &str = r#"
local cur = redis.call('GET', KEYS[1])
local held, tomb = parse(cur)
local target
if ARGV[1] == '' then
  if held == nil then
    if cur then redis.call('DEL', KEYS[1]) return 1 end
    return 0
  end
  if tomb then return 0 end
  if held == 0 then redis.call('DEL', KEYS[1]) return 1 end
  target = held - 1
else
  target = tonumber(ARGV[1])
  if held ~= nil then
    if not tomb and held > target then return 0 end
    if tomb and held > target then target = held end
  end
end
local bytes = {}
local t = target
for i = 8, 1, -1 do
  bytes[i] = string.char(t % 256)
  t = math.floor(t / 256)
end
redis.call('SET', KEYS[1], 'TC\2\1' .. table.concat(bytes) .. string.rep('\0', 8), 'PX', ARGV[2])
return 1
"#;

/// KEYS[1]; ARGV[1]: the bytes found. Deletes the key only if it still holds them (a corrupt
/// value is removed without racing a concurrent good write).
const DELETE_IF_SAME: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"#;

/// The compiled scripts (each carries its SHA1; EVALSHA falls back to EVAL once).
pub(crate) struct Scripts {
    pub(crate) set: Script,
    pub(crate) invalidate: Script,
    pub(crate) delete_if_same: Script,
}

impl Scripts {
    pub(crate) fn new() -> Self {
        Scripts {
            set: Script::new(&format!("{PARSE}{SET}")),
            invalidate: Script::new(&format!("{PARSE}{INVALIDATE}")),
            delete_if_same: Script::new(DELETE_IF_SAME),
        }
    }
}
