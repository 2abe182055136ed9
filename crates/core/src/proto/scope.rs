//! Subscription scopes (`docs/protocol.md` §5.6): path globs such as
//! `/projects/alpha/**` that narrow which nodes a server sends a client.
//!
//! A node is in scope when one of its operations touches a path a pattern
//! matches: the entry it changes (where it is now, or where it was when
//! deleted), and for creates, moves and deletes also the place they put or
//! took the entry from, or an ancestor of the scope (deleting `/projects`
//! removes `/projects/alpha` too). Histories stay causally complete: the
//! server sends the nodes in scope together with every ancestor of theirs
//! the client lacks, and holds back only nodes nothing in scope depends on.
//! Scope narrows what is sent; it grants no authority.

use std::collections::HashSet;

use thiserror::Error;

use crate::dag::{NodeIdx, VersionVector};
use crate::op::Op;
use crate::proto::message::{MAX_LIST, MAX_TEXT_BYTES};
use crate::room::Room;

/// Why a list of patterns was refused.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum ScopeError {
    /// More patterns than a message may carry.
    #[error("{0} patterns; at most {MAX_LIST}")]
    TooMany(usize),
    /// A pattern that is not an absolute path glob.
    #[error("invalid pattern {pattern:?}: {why}")]
    Invalid {
        /// The pattern.
        pattern: String,
        /// What is wrong with it.
        why: &'static str,
    },
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Segment {
    /// `**`: any number of names, none included.
    AnyDepth,
    /// One name; `*` in it matches any run of characters.
    Name(String),
}

/// A set of path globs; empty means the whole room.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Scope {
    patterns: Vec<String>,
    compiled: Vec<Vec<Segment>>,
}

impl Scope {
    /// The whole room.
    pub fn everything() -> Scope {
        Scope::default()
    }

    /// Compiles patterns: absolute paths (`/a/b`) whose names may contain
    /// `*` (any characters within one name) or be `**` (any depth, none
    /// included). No patterns means the whole room.
    pub fn parse(patterns: &[String]) -> Result<Scope, ScopeError> {
        if patterns.len() > MAX_LIST {
            return Err(ScopeError::TooMany(patterns.len()));
        }
        let invalid = |pattern: &str, why| ScopeError::Invalid {
            pattern: pattern.to_owned(),
            why,
        };
        let mut compiled = Vec::with_capacity(patterns.len());
        for pattern in patterns {
            if pattern.len() > MAX_TEXT_BYTES {
                return Err(invalid(pattern, "longer than 1024 bytes"));
            }
            let Some(rest) = pattern.strip_prefix('/') else {
                return Err(invalid(pattern, "patterns start with /"));
            };
            let mut segments = Vec::new();
            for name in rest.split('/') {
                segments.push(match name {
                    "" => return Err(invalid(pattern, "empty name")),
                    "**" => Segment::AnyDepth,
                    n if n.contains("**") => {
                        return Err(invalid(pattern, "** must be a whole name"));
                    }
                    n => Segment::Name(n.to_owned()),
                });
            }
            compiled.push(segments);
        }
        Ok(Scope {
            patterns: patterns.to_vec(),
            compiled,
        })
    }

    /// Whether the scope is the whole room.
    pub fn is_everything(&self) -> bool {
        self.compiled.is_empty()
    }

    /// The patterns as given.
    pub fn patterns(&self) -> &[String] {
        &self.patterns
    }

    /// Whether the path `names` (from the root) is in scope.
    pub fn matches(&self, names: &[&str]) -> bool {
        self.is_everything() || self.compiled.iter().any(|p| matches_from(p, names))
    }

    /// Whether the path `names` is in scope or is an ancestor of a path in
    /// scope (so moving or deleting it changes what is in scope).
    pub fn leads_into(&self, names: &[&str]) -> bool {
        self.is_everything() || self.compiled.iter().any(|p| leads_from(p, names))
    }

    /// Whether every path this scope matches is one `wider` matches too
    /// (delegated write paths may only narrow). Conservative: a pattern is
    /// within another when it is, name by name, no more general; a `*`
    /// inside a narrower name counts as wider unless the wider name is
    /// `*` itself.
    pub fn within(&self, wider: &Scope) -> bool {
        if wider.is_everything() {
            return true;
        }
        !self.is_everything()
            && self
                .compiled
                .iter()
                .all(|c| wider.compiled.iter().any(|w| pattern_within(c, w)))
    }

    /// Whether node `idx` of `room` touches the scope.
    pub fn touches(&self, room: &Room, idx: NodeIdx) -> bool {
        if self.is_everything() {
            return true;
        }
        let ops = room.dag().ops(idx);
        ops.iter().enumerate().any(|(i, op)| {
            let structural = matches!(op, Op::Create { .. } | Op::Move { .. } | Op::Delete { .. });
            room.doc()
                .touched_paths(room.dag(), idx, i as u32, op)
                .iter()
                .any(|names| {
                    if structural {
                        self.leads_into(names)
                    } else {
                        self.matches(names)
                    }
                })
        })
    }

    /// Of `candidates`, the nodes in scope that the peer lacks, plus every
    /// ancestor of theirs the peer lacks, in causal order. `peer_holds`
    /// says what the peer has: every node of an author up to that sequence
    /// number (histories are causally complete).
    pub fn select(
        &self,
        room: &Room,
        candidates: &[NodeIdx],
        peer_holds: &VersionVector,
    ) -> Vec<NodeIdx> {
        let dag = room.dag();
        let held = |n: NodeIdx| dag.seq(n) <= peer_holds.get(dag.author(n)).copied().unwrap_or(0);
        let mut stack: Vec<NodeIdx> = candidates
            .iter()
            .copied()
            .filter(|&n| !held(n) && self.touches(room, n))
            .collect();
        let mut chosen: HashSet<NodeIdx> = HashSet::new();
        while let Some(n) = stack.pop() {
            if chosen.insert(n) {
                stack.extend(
                    dag.parents(n)
                        .iter()
                        .copied()
                        .filter(|&p| !held(p) && !chosen.contains(&p)),
                );
            }
        }
        let mut out: Vec<NodeIdx> = chosen.into_iter().collect();
        out.sort_unstable();
        dag.sort_causal(&mut out);
        out
    }
}

/// Whether `pattern` matches exactly `names`.
fn matches_from(pattern: &[Segment], names: &[&str]) -> bool {
    // Rows: pattern position; columns: names consumed. `row[j]`: the
    // pattern's first i segments match the first j names.
    let mut row = vec![false; names.len() + 1];
    row[0] = true;
    for segment in pattern {
        let mut next = vec![false; names.len() + 1];
        for j in 0..=names.len() {
            next[j] = match segment {
                Segment::AnyDepth => row[j] || (j > 0 && next[j - 1]),
                Segment::Name(glob) => j > 0 && row[j - 1] && glob_matches(glob, names[j - 1]),
            };
        }
        row = next;
    }
    row[names.len()]
}

/// Whether `names` is a path `pattern` matches or the ancestor of one: some
/// prefix of the pattern matches it (any rest of a pattern matches some
/// path below, and a `**` absorbs whatever follows).
fn leads_from(pattern: &[Segment], names: &[&str]) -> bool {
    (0..=pattern.len()).any(|k| matches_from(&pattern[..k], names))
}

/// Whether every path `narrow` matches, `wide` matches too.
fn pattern_within(narrow: &[Segment], wide: &[Segment]) -> bool {
    match (narrow.first(), wide.first()) {
        (None, None) => true,
        // `**` takes any number of names, `**` among them.
        (_, Some(Segment::AnyDepth)) => {
            (0..=narrow.len()).any(|k| pattern_within(&narrow[k..], &wide[1..]))
        }
        (Some(Segment::Name(n)), Some(Segment::Name(w))) => {
            let covered = w == n || w == "*" || (!n.contains('*') && glob_matches(w, n));
            covered && pattern_within(&narrow[1..], &wide[1..])
        }
        _ => false,
    }
}

/// Whether `name` matches `glob`, where `*` is any run of characters.
fn glob_matches(glob: &str, name: &str) -> bool {
    let (g, n): (Vec<char>, Vec<char>) = (glob.chars().collect(), name.chars().collect());
    let (mut gi, mut ni) = (0, 0);
    // After a `*`: where it is in the glob and how much of the name it
    // has taken, to backtrack to.
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        if gi < g.len() && g[gi] == '*' {
            star = Some((gi, ni));
            gi += 1;
        } else if gi < g.len() && g[gi] == n[ni] {
            gi += 1;
            ni += 1;
        } else if let Some((sg, sn)) = star {
            gi = sg + 1;
            ni = sn + 1;
            star = Some((sg, sn + 1));
        } else {
            return false;
        }
    }
    g[gi..].iter().all(|&c| c == '*')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scope(p: &[&str]) -> Scope {
        Scope::parse(&p.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()).unwrap()
    }

    fn path(p: &str) -> Vec<&str> {
        p.split('/').filter(|s| !s.is_empty()).collect()
    }

    #[test]
    fn globs_match_names_depths_and_ancestors() {
        let s = scope(&["/projects/alpha/**"]);
        for inside in [
            "/projects/alpha",
            "/projects/alpha/a",
            "/projects/alpha/a/b/c",
        ] {
            assert!(s.matches(&path(inside)), "{inside}");
        }
        for outside in ["/projects", "/projects/beta/x", "/projects/alphabet", "/"] {
            assert!(!s.matches(&path(outside)), "{outside}");
        }
        assert!(s.leads_into(&path("/projects")));
        assert!(s.leads_into(&path("/")));
        assert!(!s.leads_into(&path("/projects/beta")));

        let s = scope(&["/notes/*.md", "/a/**/z"]);
        assert!(s.matches(&path("/notes/todo.md")));
        assert!(!s.matches(&path("/notes/todo.txt")));
        assert!(!s.matches(&path("/notes/sub/todo.md")));
        assert!(s.matches(&path("/a/z")));
        assert!(s.matches(&path("/a/b/c/z")));
        assert!(!s.matches(&path("/a/b/c")));
        assert!(
            s.leads_into(&path("/a/b/c")),
            "** can lead anywhere below /a"
        );
        assert!(!s.leads_into(&path("/b")));

        assert!(Scope::everything().matches(&path("/anything")));
    }

    #[test]
    fn narrower_scopes_are_within_wider_ones() {
        let within = |a: &[&str], b: &[&str]| scope(a).within(&scope(b));
        assert!(within(&["/a/b"], &["/a/**"]));
        assert!(within(&["/a/**"], &["/a/**"]));
        assert!(within(&["/a/b/**", "/a/c"], &["/a/**"]));
        assert!(within(&["/notes/x.md"], &["/notes/*.md"]));
        assert!(within(&["/notes/*.md"], &["/notes/*"]));
        assert!(within(&["/x/**"], &["/**"]));
        assert!(within(&["/a"], &[]), "everything holds everything");
        assert!(!within(&[], &["/a/**"]), "everything is wider");
        assert!(!within(&["/a/**"], &["/a/b/**"]));
        assert!(!within(&["/notes/*"], &["/notes/*.md"]));
        assert!(!within(&["/a/**"], &["/a/*"]), "** is deeper than *");
        assert!(!within(&["/b/c"], &["/a/**"]));
    }

    #[test]
    fn glob_stars_backtrack() {
        assert!(glob_matches("a*b*c", "axxbyybc"));
        assert!(glob_matches("*", ""));
        assert!(!glob_matches("a*b", "acbx"));
        assert!(glob_matches("*.md", ".md"));
    }

    #[test]
    fn invalid_patterns_are_refused() {
        for bad in ["relative", "/a//b", "/a/**b", "/", ""] {
            assert!(
                Scope::parse(&[bad.to_owned()]).is_err(),
                "{bad:?} was accepted"
            );
        }
        let many: Vec<String> = (0..=MAX_LIST).map(|i| format!("/p{i}")).collect();
        assert_eq!(Scope::parse(&many), Err(ScopeError::TooMany(MAX_LIST + 1)));
    }
}
