//! Tunnel names: three random English words (`brave-orange-tiger`) from the
//! lists shipped here, or a name the user asks for, checked as a DNS label.

use rand::RngExt;

/// Adjectives: short, common, inoffensive.
const ADJECTIVES: &[&str] = &[
    "able", "agile", "amber", "ample", "bold", "brave", "bright", "brisk", "calm", "candid",
    "careful", "cheery", "clever", "cosmic", "crisp", "curious", "daring", "deft", "eager",
    "early", "easy", "epic", "fair", "fancy", "fast", "fierce", "fine", "fluffy", "fond", "free",
    "fresh", "friendly", "gentle", "giant", "glad", "golden", "grand", "great", "happy", "hardy",
    "hasty", "honest", "humble", "jolly", "keen", "kind", "large", "lively", "loyal", "lucky",
    "merry", "mighty", "modest", "neat", "nimble", "noble", "patient", "perky", "plucky", "polite",
    "proud", "quick", "quiet", "rapid", "ready", "rich", "robust", "rosy", "royal", "rustic",
    "shiny", "silent", "simple", "sleek", "smart", "smooth", "snappy", "solid", "speedy", "steady",
    "stout", "sturdy", "sunny", "super", "swift", "tidy", "tiny", "tough", "tranquil", "trusty",
    "vivid", "warm", "wild", "wise", "witty", "young", "zesty",
];

/// Colours.
const COLOURS: &[&str] = &[
    "amber", "aqua", "azure", "beige", "black", "blue", "bronze", "brown", "coral", "crimson",
    "cyan", "gold", "gray", "green", "indigo", "ivory", "jade", "khaki", "lemon", "lilac", "lime",
    "magenta", "maroon", "mauve", "mint", "navy", "ochre", "olive", "orange", "peach", "pink",
    "plum", "purple", "red", "rose", "ruby", "rust", "sage", "salmon", "sand", "scarlet", "silver",
    "tan", "teal", "violet", "white", "yellow",
];

/// Animals.
const ANIMALS: &[&str] = &[
    "badger", "bat", "bear", "beaver", "bee", "bison", "boar", "camel", "cat", "cheetah", "cobra",
    "condor", "cougar", "coyote", "crab", "crane", "crow", "deer", "dingo", "dog", "dolphin",
    "donkey", "dove", "duck", "eagle", "eel", "elk", "falcon", "ferret", "finch", "fox", "frog",
    "gazelle", "gecko", "goat", "goose", "gopher", "hare", "hawk", "heron", "hippo", "horse",
    "hyena", "ibex", "ibis", "jackal", "jaguar", "kiwi", "koala", "lemur", "leopard", "lion",
    "lizard", "llama", "lobster", "lynx", "magpie", "marten", "mole", "moose", "moth", "mouse",
    "mule", "newt", "octopus", "orca", "otter", "owl", "ox", "panda", "panther", "parrot",
    "pelican", "penguin", "pigeon", "puffin", "puma", "quail", "rabbit", "raven", "robin",
    "salmon", "seal", "shark", "sheep", "sloth", "snail", "sparrow", "squid", "stork", "swan",
    "tiger", "toad", "trout", "turtle", "viper", "walrus", "weasel", "whale", "wolf", "wombat",
    "yak", "zebra",
];

/// Longest name: one DNS label.
pub const MAX_NAME_LEN: usize = 63;

/// A random name such as `brave-orange-tiger` (≈ 490,000 combinations).
pub fn random_name(rng: &mut impl RngExt) -> String {
    let pick = |rng: &mut dyn FnMut(usize) -> usize, list: &[&'static str]| list[rng(list.len())];
    let mut choose = |n: usize| rng.random_range(0..n);
    format!(
        "{}-{}-{}",
        pick(&mut choose, ADJECTIVES),
        pick(&mut choose, COLOURS),
        pick(&mut choose, ANIMALS)
    )
}

/// Why a requested name is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NameError {
    /// Empty, or longer than one DNS label.
    #[error("a tunnel name must be 1 to 63 characters long")]
    Length,
    /// Characters other than `a-z`, `0-9` and `-`, or a leading/trailing `-`.
    #[error("a tunnel name may only hold a-z, 0-9 and '-', and may not start or end with '-'")]
    Characters,
}

/// Checks that `name` can be the first label of `<name>.<domain>`.
pub fn validate(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > MAX_NAME_LEN {
        return Err(NameError::Length);
    }
    let ok = name
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !ok || name.starts_with('-') || name.ends_with('-') {
        return Err(NameError::Characters);
    }
    Ok(())
}

/// The tunnel name in `host` if it is `<name>.<domain>` (case-insensitive,
/// an optional port and trailing dot ignored); `None` for anything else.
pub fn name_in_host(host: &str, domain: &str) -> Option<String> {
    let host = host.rsplit_once(':').map_or(host, |(h, port)| {
        if port.bytes().all(|b| b.is_ascii_digit()) {
            h
        } else {
            host
        }
    });
    let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let domain = domain
        .strip_suffix('.')
        .unwrap_or(domain)
        .to_ascii_lowercase();
    let name = host.strip_suffix(&domain)?.strip_suffix('.')?;
    validate(name).ok()?;
    Some(name.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn random_names_are_three_valid_words() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..1_000 {
            let n = random_name(&mut rng);
            assert_eq!(n.split('-').count(), 3, "{n}");
            validate(&n).unwrap();
        }
        for list in [ADJECTIVES, COLOURS, ANIMALS] {
            for w in list {
                validate(w).unwrap();
                assert!(!w.contains('-'));
            }
        }
    }

    #[test]
    fn requested_names_are_checked_as_dns_labels() {
        assert_eq!(validate(""), Err(NameError::Length));
        assert_eq!(validate(&"a".repeat(64)), Err(NameError::Length));
        assert_eq!(validate("Upper"), Err(NameError::Characters));
        assert_eq!(validate("-lead"), Err(NameError::Characters));
        assert_eq!(validate("a.b"), Err(NameError::Characters));
        assert!(validate("my-app-2").is_ok());
    }

    proptest::proptest! {
        #[test]
        fn any_host_header_yields_a_valid_name_or_nothing(host in ".{0,80}") {
            if let Some(name) = name_in_host(&host, "example.com") {
                proptest::prop_assert!(validate(&name).is_ok());
            }
        }
    }

    #[test]
    fn the_name_is_the_first_label_under_the_domain() {
        let d = "tunnel.example.com";
        assert_eq!(
            name_in_host("brave-orange-tiger.tunnel.example.com", d).as_deref(),
            Some("brave-orange-tiger")
        );
        assert_eq!(
            name_in_host("Brave-Orange-Tiger.Tunnel.Example.com.:443", d).as_deref(),
            Some("brave-orange-tiger")
        );
        assert_eq!(name_in_host("tunnel.example.com", d), None);
        assert_eq!(name_in_host("a.b.tunnel.example.com", d), None);
        assert_eq!(name_in_host("x.eviltunnel.example.com", d), None);
        assert_eq!(name_in_host("x.other.com", d), None);
        assert_eq!(name_in_host("", d), None);
        assert_eq!(name_in_host("\u{0}\u{ff}garbage", d), None);
    }
}
