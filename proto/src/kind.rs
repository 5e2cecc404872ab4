//! One value per credential kind.
//!
//! The publisher, the broker and the agent each keep something per kind of
//! credential (a slot, a version, a served count). [`PerKind`] holds those
//! side by side so that code picks one with a lookup, `per_kind.get(kind)`,
//! instead of a `match` on [`CredentialKind`] in every place that touches
//! a kind: adding a kind is then a change here, plus the places that really
//! differ by kind (the minters, the agent's endpoints).

use crate::v1::CredentialKind;

/// One `T` for each credential kind a cluster can carry.
///
/// `CredentialKind::Unspecified` has no entry: lookups of it are `None`, so
/// a message without a kind is something the caller must refuse, never a
/// silent default.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PerKind<T> {
    /// The AWS entry.
    pub aws: T,
    /// The GCP entry.
    pub gcp: T,
}

impl CredentialKind {
    /// Every kind that carries a credential, in wire order.
    pub const KNOWN: [CredentialKind; 2] = [CredentialKind::Aws, CredentialKind::Gcp];

    /// The provider's name as users write it (`AWS`, `GCP`), for messages.
    pub fn provider(self) -> &'static str {
        match self {
            CredentialKind::Aws => "AWS",
            CredentialKind::Gcp => "GCP",
            CredentialKind::Unspecified => "unspecified",
        }
    }
}

impl<T> PerKind<T> {
    /// An entry for each kind, made by `make`.
    pub fn from_fn(mut make: impl FnMut(CredentialKind) -> T) -> Self {
        PerKind {
            aws: make(CredentialKind::Aws),
            gcp: make(CredentialKind::Gcp),
        }
    }

    /// The entry of `kind`; `None` for `Unspecified`.
    pub fn get(&self, kind: CredentialKind) -> Option<&T> {
        match kind {
            CredentialKind::Aws => Some(&self.aws),
            CredentialKind::Gcp => Some(&self.gcp),
            CredentialKind::Unspecified => None,
        }
    }

    /// The entry of `kind`, mutably; `None` for `Unspecified`.
    pub fn get_mut(&mut self, kind: CredentialKind) -> Option<&mut T> {
        match kind {
            CredentialKind::Aws => Some(&mut self.aws),
            CredentialKind::Gcp => Some(&mut self.gcp),
            CredentialKind::Unspecified => None,
        }
    }

    /// Every kind with its entry, in [`CredentialKind::KNOWN`] order.
    pub fn iter(&self) -> impl Iterator<Item = (CredentialKind, &T)> {
        [
            (CredentialKind::Aws, &self.aws),
            (CredentialKind::Gcp, &self.gcp),
        ]
        .into_iter()
    }

    /// Every kind with its entry, mutably.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (CredentialKind, &mut T)> {
        [
            (CredentialKind::Aws, &mut self.aws),
            (CredentialKind::Gcp, &mut self.gcp),
        ]
        .into_iter()
    }

    /// The same kinds, each entry passed through `f`.
    pub fn map<U>(self, mut f: impl FnMut(CredentialKind, T) -> U) -> PerKind<U> {
        PerKind {
            aws: f(CredentialKind::Aws, self.aws),
            gcp: f(CredentialKind::Gcp, self.gcp),
        }
    }

    /// References to the entries, to `map` without moving them.
    pub fn as_ref(&self) -> PerKind<&T> {
        PerKind {
            aws: &self.aws,
            gcp: &self.gcp,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lookups_reach_the_entry_of_their_kind_and_unspecified_reaches_none() {
        let mut per_kind = PerKind::from_fn(|kind| kind.label().to_owned());
        assert_eq!(per_kind.get(CredentialKind::Aws).unwrap(), "aws");
        assert_eq!(per_kind.get(CredentialKind::Gcp).unwrap(), "gcp");
        assert!(per_kind.get(CredentialKind::Unspecified).is_none());
        assert!(per_kind.get_mut(CredentialKind::Unspecified).is_none());

        per_kind.get_mut(CredentialKind::Gcp).unwrap().push('!');
        assert_eq!(per_kind.gcp, "gcp!");
        assert_eq!(per_kind.aws, "aws");
    }

    #[test]
    fn iteration_follows_the_known_kinds_in_order() {
        let per_kind = PerKind { aws: 1, gcp: 2 };
        let kinds: Vec<_> = per_kind.iter().map(|(kind, _)| kind).collect();
        assert_eq!(kinds, CredentialKind::KNOWN);
        assert_eq!(per_kind.map(|_, n| n * 10), PerKind { aws: 10, gcp: 20 });

        let mut counts = PerKind::<u32>::default();
        for (kind, count) in counts.iter_mut() {
            *count = kind as u32;
        }
        assert_eq!(counts, PerKind { aws: 1, gcp: 2 });
    }

    #[test]
    fn providers_are_named_as_users_write_them() {
        let names: Vec<_> = CredentialKind::KNOWN.iter().map(|k| k.provider()).collect();
        assert_eq!(names, ["AWS", "GCP"]);
    }
}
