//! Which processes a gateway connection comes from: the client's socket found in
//! `/proc/net/tcp` (by its two addresses), then among the descriptors of an agent's
//! processes. A gateway key is honoured only on a connection of that agent's own processes,
//! so an agent that learned another's key cannot spend on its behalf.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};

/// The inode of the TCP socket whose own address is `client` and whose peer is `server`.
pub fn socket_inode(client: SocketAddr, server: SocketAddr) -> Option<u64> {
    let (SocketAddr::V4(client), SocketAddr::V4(server)) = (client, server) else {
        return None;
    };
    let table = std::fs::read_to_string("/proc/net/tcp").ok()?;
    find_inode(&table, client, server)
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

/// Whether one of `pids` has the socket open.
pub fn held_by(inode: u64, pids: &[i32]) -> bool {
    let wanted = format!("socket:[{inode}]");
    pids.iter().any(|pid| {
        std::fs::read_dir(format!("/proc/{pid}/fd"))
            .into_iter()
            .flatten()
            .flatten()
            .any(|entry| {
                std::fs::read_link(entry.path())
                    .is_ok_and(|target| target.as_os_str() == wanted.as_str())
            })
    })
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
        assert!(held_by(inode, &[std::process::id() as i32]));
        assert!(!held_by(inode, &[1]));
        drop(client);
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
