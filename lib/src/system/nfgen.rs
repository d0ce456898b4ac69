//! The nf_tables ruleset generation of the current network namespace (`NFT_MSG_GETGEN` over
//! netlink): the kernel bumps it on every committed nftables transaction, iptables-nft's
//! included, so an unchanged generation proves an unchanged ruleset without reading it.

use std::os::fd::AsRawFd;

use nix::sys::socket::{
    recv, send, socket, AddressFamily, MsgFlags, SockFlag, SockProtocol, SockType,
};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFT_MSG_NEWGEN: u16 = 15;
const NFT_MSG_GETGEN: u16 = 16;
const NLM_F_REQUEST: u16 = 1;
const NLMSG_ERROR: u16 = 2;
const NFTA_GEN_ID: u16 = 1;

/// The generation, or None when this kernel has no nf_tables (or the answer is unreadable).
pub fn generation() -> std::io::Result<Option<u32>> {
    let fd = match socket(
        AddressFamily::Netlink,
        SockType::Raw,
        SockFlag::SOCK_CLOEXEC,
        SockProtocol::NetlinkNetFilter,
    ) {
        Ok(fd) => fd,
        Err(nix::errno::Errno::EPROTONOSUPPORT | nix::errno::Errno::EAFNOSUPPORT) => {
            return Ok(None)
        }
        Err(e) => return Err(e.into()),
    };
    // nlmsghdr (16 bytes) + nfgenmsg (family AF_UNSPEC, version 0, resource id 0).
    let mut request = Vec::with_capacity(20);
    request.extend_from_slice(&20u32.to_ne_bytes());
    request.extend_from_slice(&((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETGEN).to_ne_bytes());
    request.extend_from_slice(&NLM_F_REQUEST.to_ne_bytes());
    request.extend_from_slice(&1u32.to_ne_bytes());
    request.extend_from_slice(&0u32.to_ne_bytes());
    request.extend_from_slice(&[0, 0, 0, 0]);
    send(fd.as_raw_fd(), &request, MsgFlags::empty())?;
    let mut buf = [0u8; 4096];
    let len = recv(fd.as_raw_fd(), &mut buf, MsgFlags::empty())?;
    Ok(parse(&buf[..len]))
}

/// The `NFTA_GEN_ID` of a `NFT_MSG_NEWGEN` answer.
fn parse(answer: &[u8]) -> Option<u32> {
    let u16_at = |o: usize| Some(u16::from_ne_bytes(answer.get(o..o + 2)?.try_into().ok()?));
    let len = u32::from_ne_bytes(answer.get(0..4)?.try_into().ok()?) as usize;
    let kind = u16_at(4)?;
    if kind == NLMSG_ERROR || kind != ((NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWGEN) {
        return None;
    }
    let mut at = 20;
    while at + 4 <= len.min(answer.len()) {
        let attr_len = usize::from(u16_at(at)?);
        let attr_type = u16_at(at + 2)? & 0x3fff;
        if attr_len < 4 {
            return None;
        }
        if attr_type == NFTA_GEN_ID && attr_len >= 8 {
            return Some(u32::from_be_bytes(
                answer.get(at + 4..at + 8)?.try_into().ok()?,
            ));
        }
        at += (attr_len + 3) & !3;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_generation_attribute_and_refuses_anything_else() {
        // Captured from kernel 6.18: NEWGEN with id 1, pid, process name "python3".
        let answer = [
            0x30, 0, 0, 0, 0x0f, 0x0a, 0, 0, 1, 0, 0, 0, 0x42, 0x47, 0, 0, 0, 0, 0, 1, 8, 0, 1, 0,
            0, 0, 0, 1, 8, 0, 2, 0, 0, 0, 0x47, 0x42, 0x0c, 0, 3, 0, b'p', b'y', b't', b'h', b'o',
            b'n', b'3', 0,
        ];
        assert_eq!(parse(&answer), Some(1));
        let mut error = answer;
        error[4] = 2;
        error[5] = 0;
        assert_eq!(parse(&error), None);
        assert_eq!(parse(&answer[..10]), None);
    }

    #[test]
    fn this_kernel_answers() {
        assert!(generation().unwrap().is_some());
    }
}
