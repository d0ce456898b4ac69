//! A pool's pick map: the anonymous map its DNAT looks the backend up in, keyed by a number
//! the kernel draws once per new connection (`numgen random`, `numgen inc`, `jhash ip saddr`),
//! so the choice is one lookup whatever the pool's size, and established packets never meet
//! it (NAT runs on a connection's first packet only).
//!
//! Live backends hold key ranges as wide as their weights, in the pool's order. Drained ones
//! (weight 0) hold one key each past the live ranges and one unused key: never drawn, but the
//! listing still says every backend and its weight, so `show` gives the pool back. A
//! source-hash pool draws from a Maglev table of [`MAGLEV_BUCKETS`] keys; its weights follow
//! the table the same way.

use std::fmt::Write as _;
use std::net::IpAddr;

use crate::model::{Balance, Pool, PoolMember};
use crate::net::Family;
use crate::ownership::StableHash;

/// The buckets of a source-hash pool's Maglev table: a prime, fixed so that a change of the
/// pool moves only the buckets Maglev moves (a weight is honoured to 1/1021 of the clients).
pub(crate) const MAGLEV_BUCKETS: u32 = 1021;

/// The seed of a source-hash pool's `jhash`: without one the kernel draws a random seed for
/// each rule it loads, and every change of the pool would move every client.
const SEED: u32 = 0x7066_7764;

/// The number a pool's connections draw: its range is `0..modulus`.
pub(crate) fn modulus(pool: &Pool) -> u32 {
    match pool.balance {
        Balance::SourceHash => MAGLEV_BUCKETS,
        Balance::Random | Balance::RoundRobin => pool.total_weight(),
    }
}

/// The draw in nft's language (`numgen random mod 4`, `jhash ip saddr mod 1021`).
pub(crate) fn draw(pool: &Pool, family: Family) -> String {
    let m = modulus(pool);
    match pool.balance {
        Balance::Random => format!("numgen random mod {m}"),
        Balance::RoundRobin => format!("numgen inc mod {m}"),
        Balance::SourceHash => {
            format!("jhash {} saddr mod {m} seed {SEED:#x}", family.nft_family())
        }
    }
}

/// One entry of the map: keys `first..=last` pick `pool.backends[backend]`.
pub(crate) type Entry = (u32, u32, usize);

/// The map's entries in key order.
pub(crate) fn entries(pool: &Pool) -> Vec<Entry> {
    let live: Vec<usize> = (0..pool.backends.len())
        .filter(|&i| pool.backends[i].weight > 0)
        .collect();
    let mut out: Vec<Entry> = Vec::new();
    let mut next = 0;
    if pool.balance == Balance::SourceHash {
        for (bucket, backend) in (0..).zip(maglev(&pool.backends, &live)) {
            match out.last_mut() {
                Some(last) if last.2 == backend => last.1 = bucket,
                _ => out.push((bucket, bucket, backend)),
            }
        }
        next = MAGLEV_BUCKETS;
    }
    for &i in &live {
        let w = u32::from(pool.backends[i].weight);
        out.push((next, next + w - 1, i));
        next += w;
    }
    // One unused key, then the drained backends.
    next += 1;
    for i in (0..pool.backends.len()).filter(|i| !live.contains(i)) {
        out.push((next, next, i));
        next += 1;
    }
    out
}

/// The map in nft's language: `{ 0 : 10.0.0.1 . 80, 1-2 : 10.0.0.2 . 80 }`.
pub(crate) fn map_text(pool: &Pool) -> String {
    let mut out = String::from("{ ");
    for (n, (first, last, i)) in entries(pool).into_iter().enumerate() {
        if n > 0 {
            out.push_str(", ");
        }
        let _ = if first == last {
            write!(out, "{first} : ")
        } else {
            write!(out, "{first}-{last} : ")
        };
        let b = &pool.backends[i];
        let _ = match b.port {
            Some(p) => write!(out, "{} . {p}", b.addr),
            None => write!(out, "{}", b.addr),
        };
    }
    out.push_str(" }");
    out
}

/// The pool a listed map says, given its draw: None unless the map is exactly what
/// [`entries`] writes for that pool (anything else is not portfwd's to keep).
pub(crate) fn read(
    balance: Balance,
    modulus: u32,
    listed: &[(u32, u32, IpAddr, Option<u16>)],
) -> Option<Pool> {
    let mut listed = listed.to_vec();
    listed.sort_unstable_by_key(|e| e.0);
    let start = match balance {
        Balance::SourceHash if modulus == MAGLEV_BUCKETS => MAGLEV_BUCKETS,
        Balance::SourceHash => return None,
        Balance::Random | Balance::RoundRobin => 0,
    };
    let legend: Vec<_> = listed.iter().filter(|e| e.0 >= start).collect();
    let mut backends = Vec::new();
    let mut next = start;
    let mut rest = legend.iter().peekable();
    while let Some(e) = rest.next_if(|e| e.0 == next) {
        let weight = u16::try_from(e.1.checked_sub(e.0)? + 1).ok()?;
        backends.push(PoolMember {
            addr: e.2,
            port: e.3,
            weight,
        });
        next = e.1 + 1;
    }
    next += 1;
    for e in rest {
        if e.0 != next || e.1 != e.0 {
            return None;
        }
        backends.push(PoolMember {
            addr: e.2,
            port: e.3,
            weight: 0,
        });
        next += 1;
    }
    let pool = Pool {
        backends,
        balance,
        persistence: None,
    };
    let written: Vec<_> = entries(&pool)
        .into_iter()
        .map(|(a, b, i)| (a, b, pool.backends[i].addr, pool.backends[i].port))
        .collect();
    (self::modulus(&pool) == modulus && written == listed).then_some(pool)
}

/// Maglev's lookup table (Eisenbud et al., 2016) over the live backends, weighted: each
/// backend walks its own permutation of the buckets, taking the next free one per turn, and
/// takes turns in proportion to its weight. A backend's permutation depends on its address
/// alone, so adding or removing one moves about its share of the buckets, not most of them.
fn maglev(backends: &[PoolMember], live: &[usize]) -> Vec<usize> {
    let m = MAGLEV_BUCKETS;
    let walks: Vec<(u32, u32)> = live
        .iter()
        .map(|&i| {
            let b = &backends[i];
            let name = format!("{} {}", b.addr, b.port.unwrap_or(0));
            let hash = |seed: &[u8]| StableHash::new().part(seed).part(name.as_bytes()).finish();
            (hash(b"offset") % m, hash(b"skip") % (m - 1) + 1)
        })
        .collect();
    let weights: Vec<u32> = live
        .iter()
        .map(|&i| u32::from(backends[i].weight))
        .collect();
    let top = weights.iter().copied().max().unwrap_or(1);
    let mut table = vec![usize::MAX; m as usize];
    let mut taken = vec![0u32; live.len()];
    let mut credit = vec![0u32; live.len()];
    let mut filled = 0;
    if live.is_empty() {
        return Vec::new();
    }
    loop {
        for k in 0..live.len() {
            credit[k] += weights[k];
            while credit[k] >= top {
                credit[k] -= top;
                let (offset, skip) = walks[k];
                loop {
                    let bucket = (offset + taken[k] * skip) % m;
                    taken[k] += 1;
                    if table[bucket as usize] == usize::MAX {
                        table[bucket as usize] = live[k];
                        filled += 1;
                        break;
                    }
                }
                if filled == m {
                    return table;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pool(balance: Balance, weights: &[u16]) -> Pool {
        Pool {
            backends: weights
                .iter()
                .zip(1u8..)
                .map(|(&weight, i)| PoolMember {
                    addr: IpAddr::from([10, 0, 0, i]),
                    port: Some(80),
                    weight,
                })
                .collect(),
            balance,
            persistence: None,
        }
    }

    fn listed(p: &Pool) -> Vec<(u32, u32, IpAddr, Option<u16>)> {
        entries(p)
            .into_iter()
            .map(|(a, b, i)| (a, b, p.backends[i].addr, p.backends[i].port))
            .collect()
    }

    #[test]
    fn weights_are_key_ranges_and_drained_backends_keys_past_them() {
        let p = pool(Balance::Random, &[1, 0, 2]);
        assert_eq!(modulus(&p), 3);
        assert_eq!(
            map_text(&p),
            "{ 0 : 10.0.0.1 . 80, 1-2 : 10.0.0.3 . 80, 4 : 10.0.0.2 . 80 }"
        );
        assert_eq!(draw(&p, Family::V4), "numgen random mod 3");
    }

    /// Every pool reads back from its map as itself (drained backends last); a map portfwd
    /// would not write reads as nothing.
    #[test]
    fn a_pool_reads_back_from_its_map() {
        for balance in [Balance::Random, Balance::RoundRobin, Balance::SourceHash] {
            for weights in [&[1][..], &[1, 1, 2], &[3, 0, 1000, 0], &[0, 5]] {
                let mut p = pool(balance, weights);
                let m = modulus(&p);
                let back = read(balance, m, &listed(&p)).expect("reads back");
                p.backends.sort_by_key(|b| b.weight == 0);
                assert_eq!(back, p, "{balance:?} {weights:?}");
            }
        }
        let p = pool(Balance::Random, &[1, 2]);
        let mut edited = listed(&p);
        edited[1].1 += 1;
        assert_eq!(read(Balance::Random, 3, &edited), None);
        assert_eq!(read(Balance::RoundRobin, 4, &listed(&p)), None);
    }

    /// Maglev's promise: buckets in proportion to the weights, and one backend added moves
    /// about its share of them.
    #[test]
    fn maglev_shares_follow_weights_and_a_new_backend_moves_its_share() {
        let count = |p: &Pool| {
            let table = maglev(&p.backends, &(0..p.backends.len()).collect::<Vec<_>>());
            let mut n = vec![0usize; p.backends.len()];
            for &b in &table {
                n[b] += 1;
            }
            (table, n)
        };
        let (three, n) = count(&pool(Balance::SourceHash, &[1, 1, 2]));
        let m = MAGLEV_BUCKETS as usize;
        assert!(
            n.iter().sum::<usize>() == m && n[2] > m / 2 - 20 && n[0] > m / 4 - 20,
            "{n:?}"
        );
        let (four, _) = count(&pool(Balance::SourceHash, &[1, 1, 2, 1]));
        let moved = three.iter().zip(&four).filter(|(a, b)| a != b).count();
        // The new backend's share is a fifth; Maglev moves a little more than that.
        assert!(moved < m * 3 / 10, "{moved} of {m} buckets moved");
    }
}
