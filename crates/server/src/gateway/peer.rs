//! Which processes a gateway connection comes from: the client's socket found by its two
//! addresses (asked of the kernel's sock_diag, which looks that one socket up; else read from
//! `/proc/net/tcp`), then among the descriptors of an agent's processes. A gateway key is honoured only on a connection of that agent's own processes,
//! so an agent that learned another's key cannot spend on its behalf.

use std::collections::HashSet;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// The inode of the TCP socket whose own address is `client` and whose peer is `server`.
pub fn socket_inode(client: SocketAddr, server: SocketAddr) -> Option<u64> {
    let (SocketAddr::V4(client), SocketAddr::V4(server)) = (client, server) else {
        return None;
    };
    diag_inode(client, server).or_else(|| {
        let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
        find_inode(&table, client, server)
    })
}

/// One `SOCK_DIAG_BY_FAMILY` request for the TCP socket with these addresses (not a dump:
/// the kernel looks it up), answered with its `inet_diag_msg`.
fn diag_inode(client: SocketAddrV4, server: SocketAddrV4) -> Option<u64> {
    use nix::libc;
    const SOCK_DIAG_BY_FAMILY: u16 = 20;
    // nlmsghdr (16), then inet_diag_req_v2: family, protocol, ext, pad, states (8), and
    // inet_diag_sockid: sport, dport (big-endian), src[4], dst[4], if, cookie[2] (48).
    const LEN: usize = 16 + 56;
    let mut request = [0u8; LEN];
    request[0..4].copy_from_slice(&(LEN as u32).to_ne_bytes());
    request[4..6].copy_from_slice(&SOCK_DIAG_BY_FAMILY.to_ne_bytes());
    request[6..8].copy_from_slice(&(libc::NLM_F_REQUEST as u16).to_ne_bytes());
    request[16] = libc::AF_INET as u8;
    request[17] = libc::IPPROTO_TCP as u8;
    request[20..24].copy_from_slice(&u32::MAX.to_ne_bytes());
    let id = &mut request[24..];
    id[0..2].copy_from_slice(&client.port().to_be_bytes());
    id[2..4].copy_from_slice(&server.port().to_be_bytes());
    id[4..8].copy_from_slice(&client.ip().octets());
    id[20..24].copy_from_slice(&server.ip().octets());
    // No cookie (INET_DIAG_NOCOOKIE).
    id[40..48].copy_from_slice(&[0xff; 8]);
    // SAFETY: a new socket of ours, a buffer of ours to send, another to receive into; the
    // descriptor is closed by the OwnedFd.
    unsafe {
        let fd = libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            libc::NETLINK_SOCK_DIAG,
        );
        if fd < 0 {
            return None;
        }
        let fd = <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd);
        let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
        if libc::send(raw, request.as_ptr().cast(), request.len(), 0) < 0 {
            return None;
        }
        let mut answer = [0u8; 512];
        let got = libc::recv(raw, answer.as_mut_ptr().cast(), answer.len(), 0);
        // nlmsghdr, then inet_diag_msg: family, state, timer, retrans (4), sockid (48),
        // expires, rqueue, wqueue, uid, inode (4 each).
        let got = usize::try_from(got).ok()?;
        let kind = u16::from_ne_bytes([answer[4], answer[5]]);
        if got < 16 + 72 || kind != SOCK_DIAG_BY_FAMILY {
            return None;
        }
        let inode = u32::from_ne_bytes(answer[16 + 68..16 + 72].try_into().ok()?);
        Some(u64::from(inode))
    }
}

fn find_inode(table: &str, client: SocketAddrV4, server: SocketAddrV4) -> Option<u64> {
    table.lines().skip(1).find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let (local, remote, inode) = (fields.get(1)?, fields.get(2)?, fields.get(9)?);
        (parse_address(local)? == client && parse_address(remote)? == server)
            .then(|| inode.parse().ok())
            .flatten()
    })
}

/// `0100007F:1F90`: the address as the kernel's 32-bit word in this host's byte order, and
/// the port.
fn parse_address(text: &str) -> Option<SocketAddrV4> {
    let (ip, port) = text.split_once(':')?;
    let ip = u32::from_str_radix(ip, 16).ok()?;
    let port = u16::from_str_radix(port, 16).ok()?;
    Some(SocketAddrV4::new(Ipv4Addr::from(ip.to_ne_bytes()), port))
}

/// The inodes of the sockets `pids` have open.
pub fn sockets_of(pids: &[i32]) -> HashSet<u64> {
    pids.iter()
        .flat_map(|pid| {
            std::fs::read_dir(format!("/proc/{pid}/fd"))
                .into_iter()
                .flatten()
                .flatten()
        })
        .filter_map(|entry| {
            let target = std::fs::read_link(entry.path()).ok()?;
            target
                .to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_connection_of_this_process_is_found_and_held_by_it() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        let inode = socket_inode(peer, listener.local_addr().unwrap()).expect("in /proc/net/tcp");
        assert!(sockets_of(&[std::process::id() as i32]).contains(&inode));
        assert!(!sockets_of(&[1]).contains(&inode));
        drop(client);
    }

    #[test]
    fn sock_diag_and_the_table_agree() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let _client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (_accepted, peer) = listener.accept().unwrap();
        let (SocketAddr::V4(client), SocketAddr::V4(server)) =
            (peer, listener.local_addr().unwrap())
        else {
            panic!("IPv4");
        };
        let table = std::fs::read_to_string("/proc/net/tcp").unwrap();
        assert_eq!(
            diag_inode(client, server),
            find_inode(&table, client, server)
        );
        assert!(diag_inode(client, server).is_some());
    }

    #[test]
    fn the_kernels_table_is_read_as_it_writes_it() {
        let table = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid  timeout inode\n   0: 0100007F:D431 0100007F:1F90 01 00000000:00000000 00:00000000 00000000     0        0 424242 1 0000000000000000 20 4 30 10 -1\n";
        let client = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0xD431);
        let server = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0x1F90);
        assert_eq!(find_inode(table, client, server), Some(424242));
        assert_eq!(find_inode(table, server, client), None);
    }
}
