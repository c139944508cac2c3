//! nf_tables over NETLINK_NETFILTER, by hand: transactions (batches) of table-object messages
//! and the handful of expressions a session's chains are made of, plus the dumps Stockade reads
//! back (rules with their counters and comments, chains, sets).
//!
//! Why not the `nft` binary for everything: each `nft` run costs ~5 ms here (process start,
//! cache fetch), three or four per session. And why one socket for the process's whole life:
//! closing a netfilter socket makes the kernel wait for the deferred destruction of deleted
//! objects (an RCU grace period, ~10 ms here); a socket that stays open leaves that work to the
//! kernel's worker, off the session's path.
//!
//! Values follow nf_tables' conventions: integer attributes big-endian; register contents in
//! packet byte order, except ct state, which is a host-endian bitmask.

use std::sync::Mutex;

use super::netlink::{
    ack_errno, attrs, Msg, NetError, Socket, NLA_F_NESTED, NLMSG_DONE, NLMSG_ERROR, NLM_F_ACK, NLM_F_APPEND,
    NLM_F_CREATE, NLM_F_DUMP, NLM_F_MULTI,
};

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
/// `enum nft_reject_types` and the icmpx code of <linux/netfilter/nf_tables.h>.
const NFT_REJECT_TCP_RST: u32 = 1;
const NFT_REJECT_ICMPX_UNREACH: u32 = 2;
const NFT_REJECT_ICMPX_ADMIN_PROHIBITED: u8 = 3;

pub const NFPROTO_INET: u8 = 1;

// NFT_MSG_*
const NEWCHAIN: u16 = 3;
const GETCHAIN: u16 = 4;
const DELCHAIN: u16 = 5;
const NEWRULE: u16 = 6;
const GETRULE: u16 = 7;
const NEWSET: u16 = 9;
const GETSET: u16 = 10;
const DELSET: u16 = 11;
const NEWSETELEM: u16 = 12;
const DELSETELEM: u16 = 14;

// Attributes, by object.
const NFTA_CHAIN_TABLE: u16 = 1;
const NFTA_CHAIN_NAME: u16 = 3;
const NFTA_RULE_TABLE: u16 = 1;
const NFTA_RULE_CHAIN: u16 = 2;
const NFTA_RULE_EXPRESSIONS: u16 = 4;
const NFTA_RULE_USERDATA: u16 = 7;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_EXPR_NAME: u16 = 1;
const NFTA_EXPR_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NFTA_DATA_VERDICT: u16 = 2;
const NFTA_VERDICT_CODE: u16 = 1;
const NFTA_VERDICT_CHAIN: u16 = 2;
const NFTA_SET_TABLE: u16 = 1;
const NFTA_SET_NAME: u16 = 2;
const NFTA_SET_FLAGS: u16 = 3;
const NFTA_SET_KEY_TYPE: u16 = 4;
const NFTA_SET_KEY_LEN: u16 = 5;
const NFTA_SET_ID: u16 = 10;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_SET_ELEM_TIMEOUT: u16 = 4;
const NFTA_COUNTER_PACKETS: u16 = 2;
/// libnftnl's rule-comment TLV inside NFTA_RULE_USERDATA (what `nft` shows as `comment`).
const UDATA_RULE_COMMENT: u8 = 0;

pub(crate) const SET_F_MAP: u32 = 0x8;
pub(crate) const SET_F_TIMEOUT: u32 = 0x10;
/// nft's data type of IPv4 addresses (for `nft list` to show the set's elements as addresses).
pub(crate) const TYPE_IPADDR: u32 = 7;

/// Registers: the verdict register and the first 16-byte data register.
pub mod reg {
    pub const VERDICT: u32 = 0;
    pub const R1: u32 = 1;
}
pub mod meta {
    pub const NFPROTO: u32 = 15;
    pub const L4PROTO: u32 = 16;
}
pub mod base {
    pub const NETWORK: u32 = 1;
    pub const TRANSPORT: u32 = 2;
}
pub mod op {
    pub const EQ: u32 = 0;
    pub const NEQ: u32 = 1;
    pub const LTE: u32 = 3;
    pub const GTE: u32 = 5;
}

/// A rule's final decision.
#[derive(Debug, Clone, Copy)]
pub enum Verdict<'a> {
    Accept,
    Drop,
    Jump(&'a str),
    Goto(&'a str),
}

impl Verdict<'_> {
    fn encode(self, m: &mut Msg) {
        let (code, chain): (i32, Option<&str>) = match self {
            Verdict::Drop => (0, None),
            Verdict::Accept => (1, None),
            Verdict::Jump(c) => (-3, Some(c)),
            Verdict::Goto(c) => (-4, Some(c)),
        };
        m.begin(NFTA_DATA_VERDICT | NLA_F_NESTED);
        m.attr(NFTA_VERDICT_CODE, &code.to_be_bytes());
        if let Some(c) = chain {
            m.str_attr(NFTA_VERDICT_CHAIN, c);
        }
        m.end();
    }
}

/// The expressions of one rule, in order.
pub struct Rule {
    m: Msg,
}

impl Rule {
    fn expr(&mut self, name: &str, body: impl FnOnce(&mut Msg)) -> &mut Rule {
        self.m.begin(NFTA_LIST_ELEM | NLA_F_NESTED).str_attr(NFTA_EXPR_NAME, name).begin(NFTA_EXPR_DATA | NLA_F_NESTED);
        body(&mut self.m);
        self.m.end().end();
        self
    }
    fn value(m: &mut Msg, kind: u16, data: &[u8]) {
        m.begin(kind | NLA_F_NESTED).attr(NFTA_DATA_VALUE, data).end();
    }

    /// `meta KEY` into register 1.
    pub fn meta(&mut self, key: u32) -> &mut Rule {
        self.expr("meta", |m| {
            m.attr(1, &reg::R1.to_be_bytes()).attr(2, &key.to_be_bytes());
        })
    }
    /// `LEN` bytes at `OFFSET` of header `BASE` into register 1.
    pub fn payload(&mut self, base: u32, offset: u32, len: u32) -> &mut Rule {
        self.expr("payload", |m| {
            m.attr(1, &reg::R1.to_be_bytes())
                .attr(2, &base.to_be_bytes())
                .attr(3, &offset.to_be_bytes())
                .attr(4, &len.to_be_bytes());
        })
    }
    /// Register 1 &= mask.
    pub fn mask(&mut self, mask: &[u8]) -> &mut Rule {
        let zero = vec![0u8; mask.len()];
        self.expr("bitwise", |m| {
            m.attr(1, &reg::R1.to_be_bytes())
                .attr(2, &reg::R1.to_be_bytes())
                .attr(3, &(mask.len() as u32).to_be_bytes());
            Rule::value(m, 4, mask);
            Rule::value(m, 5, &zero);
        })
    }
    /// Register 1 OP data, or the rule stops here.
    pub fn cmp(&mut self, op: u32, data: &[u8]) -> &mut Rule {
        self.expr("cmp", |m| {
            m.attr(1, &reg::R1.to_be_bytes()).attr(2, &op.to_be_bytes());
            Rule::value(m, 3, data);
        })
    }
    /// `ct state` into register 1 (a host-endian bitmask).
    pub fn ct_state(&mut self) -> &mut Rule {
        self.expr("ct", |m| {
            m.attr(1, &reg::R1.to_be_bytes()).attr(2, &0u32.to_be_bytes());
        })
    }
    /// Register 1 is an element of `set`.
    pub fn lookup(&mut self, set: &str) -> &mut Rule {
        self.expr("lookup", |m| {
            m.str_attr(1, set).attr(2, &reg::R1.to_be_bytes());
        })
    }
    pub fn counter(&mut self) -> &mut Rule {
        self.expr("counter", |m| {
            m.attr(1, &0u64.to_be_bytes()).attr(NFTA_COUNTER_PACKETS, &0u64.to_be_bytes());
        })
    }
    /// Packets per second, with a burst, over which the rule stops here.
    pub fn limit(&mut self, per_second: u64, burst: u32) -> &mut Rule {
        self.expr("limit", |m| {
            m.attr(1, &per_second.to_be_bytes())
                .attr(2, &1u64.to_be_bytes())
                .attr(3, &burst.to_be_bytes())
                .attr(4, &0u32.to_be_bytes());
        })
    }
    /// A copy to NFLOG group `group` with `prefix`.
    pub fn log(&mut self, group: u16, prefix: &str) -> &mut Rule {
        self.expr("log", |m| {
            m.attr(1, &group.to_be_bytes()).str_attr(2, prefix);
        })
    }
    /// `reject with tcp reset`: only for TCP packets (the caller matches them first).
    pub fn reject_tcp_reset(&mut self) -> &mut Rule {
        self.expr("reject", |m| {
            m.attr(1, &NFT_REJECT_TCP_RST.to_be_bytes());
        })
    }
    /// `reject with icmpx admin-prohibited`: ICMP or ICMPv6, whichever the packet's family takes.
    pub fn reject_admin_prohibited(&mut self) -> &mut Rule {
        self.expr("reject", |m| {
            m.attr(1, &NFT_REJECT_ICMPX_UNREACH.to_be_bytes()).attr(2, &[NFT_REJECT_ICMPX_ADMIN_PROHIBITED]);
        })
    }
    pub fn verdict(&mut self, v: Verdict) -> &mut Rule {
        self.expr("immediate", |m| {
            m.attr(1, &reg::VERDICT.to_be_bytes());
            m.begin(2 | NLA_F_NESTED);
            v.encode(m);
            m.end();
        })
    }
}

/// A set element to add or delete.
pub struct Elem<'a> {
    pub key: &'a [u8],
    pub verdict: Option<Verdict<'a>>,
    pub timeout_ms: Option<u64>,
}

/// One transaction: applied entirely or not at all.
pub struct Batch {
    family: u8,
    table: String,
    msgs: Vec<(Msg, String)>,
}

fn nfgenmsg(family: u8, res_id: u16) -> [u8; 4] {
    let r = res_id.to_be_bytes();
    [family, 0, r[0], r[1]]
}

fn kind(msg: u16) -> u16 {
    (NFNL_SUBSYS_NFTABLES << 8) | msg
}

impl Batch {
    pub fn new(family: u8, table: &str) -> Batch {
        Batch { family, table: table.to_owned(), msgs: Vec::new() }
    }

    fn msg(&mut self, msg: u16, flags: u16, what: String) -> &mut Msg {
        let m = Msg::new(kind(msg), flags | NLM_F_ACK, &nfgenmsg(self.family, 0));
        self.msgs.push((m, what));
        &mut self.msgs.last_mut().expect("just pushed").0
    }

    pub fn add_chain(&mut self, name: &str) {
        let t = self.table.clone();
        self.msg(NEWCHAIN, NLM_F_CREATE, format!("add chain {name}"))
            .str_attr(NFTA_CHAIN_TABLE, &t)
            .str_attr(NFTA_CHAIN_NAME, name);
    }

    pub fn del_chain(&mut self, name: &str) {
        let t = self.table.clone();
        self.msg(DELCHAIN, 0, format!("delete chain {name}"))
            .str_attr(NFTA_CHAIN_TABLE, &t)
            .str_attr(NFTA_CHAIN_NAME, name);
    }

    /// A named set of `key_len`-byte keys.
    pub fn add_set(&mut self, name: &str, flags: u32, key_type: u32, key_len: u32, id: u32) {
        let t = self.table.clone();
        self.msg(NEWSET, NLM_F_CREATE, format!("add set {name}"))
            .str_attr(NFTA_SET_TABLE, &t)
            .str_attr(NFTA_SET_NAME, name)
            .attr(NFTA_SET_FLAGS, &flags.to_be_bytes())
            .attr(NFTA_SET_KEY_TYPE, &key_type.to_be_bytes())
            .attr(NFTA_SET_KEY_LEN, &key_len.to_be_bytes())
            .attr(NFTA_SET_ID, &id.to_be_bytes());
    }

    pub fn del_set(&mut self, name: &str) {
        let t = self.table.clone();
        self.msg(DELSET, 0, format!("delete set {name}")).str_attr(NFTA_SET_TABLE, &t).str_attr(NFTA_SET_NAME, name);
    }

    /// Appends a rule to `chain`, with an optional comment (as `nft`'s `comment "..."`).
    pub fn add_rule(&mut self, chain: &str, comment: Option<&str>, build: impl FnOnce(&mut Rule)) {
        let mut m = Msg::new(kind(NEWRULE), NLM_F_CREATE | NLM_F_APPEND | NLM_F_ACK, &nfgenmsg(self.family, 0));
        m.str_attr(NFTA_RULE_TABLE, &self.table).str_attr(NFTA_RULE_CHAIN, chain);
        m.begin(NFTA_RULE_EXPRESSIONS | NLA_F_NESTED);
        let mut r = Rule { m };
        build(&mut r);
        let mut m = r.m;
        m.end();
        if let Some(c) = comment {
            let mut u = vec![UDATA_RULE_COMMENT, (c.len() + 1) as u8];
            u.extend_from_slice(c.as_bytes());
            u.push(0);
            m.attr(NFTA_RULE_USERDATA, &u);
        }
        self.msgs.push((m, format!("add rule to {chain}{}", comment.map(|c| format!(" ({c})")).unwrap_or_default())));
    }

    fn elems(&mut self, msg: u16, flags: u16, set: &str, elems: &[Elem]) {
        let t = self.table.clone();
        let verb = if msg == NEWSETELEM { "add" } else { "delete" };
        let m = self.msg(msg, flags, format!("{verb} element(s) of {set}"));
        m.str_attr(NFTA_SET_ELEM_LIST_TABLE, &t).str_attr(NFTA_SET_ELEM_LIST_SET, set);
        m.begin(NFTA_SET_ELEM_LIST_ELEMENTS | NLA_F_NESTED);
        for e in elems {
            m.begin(NFTA_LIST_ELEM | NLA_F_NESTED);
            Rule::value(m, NFTA_SET_ELEM_KEY, e.key);
            if let Some(v) = e.verdict {
                m.begin(NFTA_SET_ELEM_DATA | NLA_F_NESTED);
                v.encode(m);
                m.end();
            }
            if let Some(t) = e.timeout_ms {
                m.attr(NFTA_SET_ELEM_TIMEOUT, &t.to_be_bytes());
            }
            m.end();
        }
        m.end();
    }

    pub fn add_elems(&mut self, set: &str, elems: &[Elem]) {
        self.elems(NEWSETELEM, NLM_F_CREATE, set, elems);
    }

    pub fn del_elems(&mut self, set: &str, elems: &[Elem]) {
        self.elems(DELSETELEM, 0, set, elems);
    }

    /// Sends the transaction; the error names the first message the kernel refused.
    pub fn commit(self) -> Result<(), NetError> {
        if self.msgs.is_empty() {
            return Ok(());
        }
        with_socket(|s| s.commit(self))
    }
}

/// An ifname as a set key: NUL-padded to IFNAMSIZ.
pub(crate) fn ifname_key(name: &str) -> [u8; 16] {
    let mut k = [0u8; 16];
    let b = name.as_bytes();
    k[..b.len().min(15)].copy_from_slice(&b[..b.len().min(15)]);
    k
}

/// The process's one nf_tables socket (see the module's doc for why it stays open), its receive
/// buffer large enough for a dump of every session's rules.
static SOCKET: Mutex<Option<Socket>> = Mutex::new(None);

fn with_socket<T>(f: impl FnOnce(&mut Socket) -> Result<T, NetError>) -> Result<T, NetError> {
    let mut guard = SOCKET.lock().unwrap_or_else(|p| p.into_inner());
    if guard.is_none() {
        *guard = Some(Socket::open(libc::NETLINK_NETFILTER, Some(1 << 20)).map_err(|e| e.about("nftables"))?);
    }
    let r = f(guard.as_mut().expect("opened above"));
    if r.is_err() {
        // A socket in an unknown state (a half-read answer) is not reused.
        *guard = None;
    }
    r
}

/// The kernel answers a batch while it is being sent; this long without a word is a failure.
const ANSWER_MS: i32 = 5000;

trait Transactions {
    fn commit(&mut self, batch: Batch) -> Result<(), NetError>;
    fn dump(&mut self, msg: u16, family: u8, attrs_of: &[(u16, &str)], each: impl FnMut(&[u8]))
        -> Result<(), NetError>;
}

impl Transactions for Socket {
    fn commit(&mut self, batch: Batch) -> Result<(), NetError> {
        let res = nfgenmsg(0, NFNL_SUBSYS_NFTABLES);
        let mut bytes = Vec::new();
        let begin = self.next_seq();
        bytes.extend(Msg::new(NFNL_MSG_BATCH_BEGIN, 0, &res).finish(begin));
        let first = begin.wrapping_add(1);
        let mut what = Vec::new();
        for (m, w) in batch.msgs {
            let seq = self.next_seq();
            bytes.extend(m.finish(seq));
            what.push(w);
        }
        let end = self.next_seq();
        bytes.extend(Msg::new(NFNL_MSG_BATCH_END, 0, &res).finish(end));
        self.send(&bytes).map_err(|e| e.about("nftables"))?;
        // One answer per message (each asked for an ack); the first refusal ends the wait (the
        // kernel rolls the whole batch back). Whatever answers are left unread go with the
        // socket, which `with_socket` drops after an error.
        let mut pending = what.len();
        let mut failure: Option<NetError> = None;
        self.read(ANSWER_MS, |h, body| {
            if h.kind != NLMSG_ERROR {
                return false;
            }
            let errno = ack_errno(body);
            let idx = h.seq.wrapping_sub(first) as usize;
            if h.seq == begin && errno != 0 {
                failure = Some(NetError::Kernel { what: "nftables: batch".into(), errno });
                return true;
            }
            if idx >= what.len() {
                return false;
            }
            if errno != 0 {
                failure = Some(NetError::Kernel { what: format!("nftables: {}", what[idx]), errno });
                return true;
            }
            pending -= 1;
            pending == 0
        })
        .map_err(|e| e.about("nftables"))?;
        failure.map_or(Ok(()), Err)
    }

    /// A dump request; `each` gets every object's attributes.
    fn dump(
        &mut self,
        msg: u16,
        family: u8,
        attrs_of: &[(u16, &str)],
        mut each: impl FnMut(&[u8]),
    ) -> Result<(), NetError> {
        let mut m = Msg::new(kind(msg), NLM_F_DUMP, &nfgenmsg(family, 0));
        for (a, v) in attrs_of {
            m.str_attr(*a, v);
        }
        let seq = self.next_seq();
        self.send(&m.finish(seq)).map_err(|e| e.about("nftables dump"))?;
        let mut err = None;
        self.read(ANSWER_MS, |h, body| {
            if h.seq != seq {
                return false;
            }
            match h.kind {
                NLMSG_DONE => true,
                NLMSG_ERROR => {
                    let errno = ack_errno(body);
                    if errno != 0 {
                        err = Some(errno);
                    }
                    true
                }
                _ => {
                    if let Some(b) = body.get(4..) {
                        each(b);
                    }
                    h.flags & NLM_F_MULTI == 0
                }
            }
        })
        .map_err(|e| e.about("nftables dump"))?;
        match err {
            Some(errno) => Err(NetError::Kernel { what: "nftables dump".into(), errno }),
            None => Ok(()),
        }
    }
}

fn nla_str(v: &[u8]) -> String {
    String::from_utf8_lossy(v.split(|c| *c == 0).next().unwrap_or(v)).into_owned()
}

/// Chains of a table, by name. `Err` when the table does not exist.
pub fn chains(family: u8, table: &str) -> Result<Vec<String>, NetError> {
    let mut out = Vec::new();
    with_socket(|s| {
        s.dump(GETCHAIN, family, &[(NFTA_CHAIN_TABLE, table)], |b| {
            let a = attrs(b);
            let t = a.iter().find(|(k, _)| *k == NFTA_CHAIN_TABLE).map(|(_, v)| nla_str(v));
            if t.as_deref() == Some(table) {
                if let Some((_, n)) = a.iter().find(|(k, _)| *k == NFTA_CHAIN_NAME) {
                    out.push(nla_str(n));
                }
            }
        })
    })?;
    Ok(out)
}

/// Sets of a table: (name, flags).
pub fn sets(family: u8, table: &str) -> Result<Vec<(String, u32)>, NetError> {
    let mut out = Vec::new();
    with_socket(|s| {
        s.dump(GETSET, family, &[(NFTA_SET_TABLE, table)], |b| {
            let a = attrs(b);
            let name = a.iter().find(|(k, _)| *k == NFTA_SET_NAME).map(|(_, v)| nla_str(v));
            let flags = a
                .iter()
                .find(|(k, _)| *k == NFTA_SET_FLAGS)
                .and_then(|(_, v)| v.get(0..4))
                .map(|v| u32::from_be_bytes(v.try_into().expect("4 bytes")))
                .unwrap_or(0);
            if let Some(n) = name {
                out.push((n, flags));
            }
        })
    })?;
    Ok(out)
}

/// A rule as read back: its chain, its comment and the packets its counters saw.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuleInfo {
    pub chain: String,
    pub comment: Option<String>,
    pub packets: u64,
    /// Expression names in order (for tests and diagnostics).
    pub exprs: Vec<String>,
}

/// Rules of a table, optionally of one chain only.
pub fn rules(family: u8, table: &str, chain: Option<&str>) -> Result<Vec<RuleInfo>, NetError> {
    let mut out = Vec::new();
    let mut filter = vec![(NFTA_RULE_TABLE, table)];
    if let Some(c) = chain {
        filter.push((NFTA_RULE_CHAIN, c));
    }
    with_socket(|s| {
        s.dump(GETRULE, family, &filter, |b| {
            let a = attrs(b);
            let get = |k: u16| a.iter().find(|(t, _)| *t == k).map(|(_, v)| *v);
            let Some(ch) = get(NFTA_RULE_CHAIN).map(nla_str) else { return };
            if get(NFTA_RULE_TABLE).map(nla_str).as_deref() != Some(table) || chain.is_some_and(|c| c != ch) {
                return;
            }
            let comment = get(NFTA_RULE_USERDATA).and_then(|u| {
                // TLVs: type, length, value.
                let mut u = u;
                while u.len() >= 2 {
                    let (t, l) = (u[0], u[1] as usize);
                    let v = u.get(2..2 + l)?;
                    if t == UDATA_RULE_COMMENT {
                        return Some(nla_str(v));
                    }
                    u = &u[2 + l..];
                }
                None
            });
            let (mut packets, mut exprs) = (0u64, Vec::new());
            for (_, e) in attrs(get(NFTA_RULE_EXPRESSIONS).unwrap_or_default()) {
                let ea = attrs(e);
                let name = ea.iter().find(|(k, _)| *k == NFTA_EXPR_NAME).map(|(_, v)| nla_str(v)).unwrap_or_default();
                if name == "counter" {
                    let data = ea.iter().find(|(k, _)| *k == NFTA_EXPR_DATA).map(|(_, v)| *v).unwrap_or_default();
                    if let Some((_, p)) = attrs(data).into_iter().find(|(k, _)| *k == NFTA_COUNTER_PACKETS) {
                        packets += p.get(0..8).map(|v| u64::from_be_bytes(v.try_into().expect("8 bytes"))).unwrap_or(0);
                    }
                }
                exprs.push(name);
            }
            out.push(RuleInfo { chain: ch, comment, packets, exprs });
        })
    })?;
    Ok(out)
}
