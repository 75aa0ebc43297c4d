"""Which peers may talk to a PBX-facing listener (FastAGI, FreeSWITCH ESL).

A PBX connection is trusted with real numbers (the route answer carries the
destination) and writes CDRs, so only the PBX may connect. Every PBX backend checks
its peer with the same `AllowList` at connect, before reading a byte, and drops any
other. The lists live in the config as CIDRs (`agi.allow`, default loopback only);
`parse_cidrs` is the config validator, shared by every backend's section.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Iterable

LOOPBACK = ("127.0.0.1/32", "::1/128")


def parse_cidrs(value: str | Iterable[str]) -> list[str]:
    """CIDRs (or bare addresses) as a list, from a list or from a comma/blank separated
    string (an environment override). ValueError names the bad entry."""
    items = value.replace(",", " ").split() if isinstance(value, str) else list(value)
    cidrs = []
    for item in items:
        try:
            cidrs.append(str(ipaddress.ip_network(str(item).strip(), strict=False)))
        except ValueError:
            raise ValueError(f"'{item}' is not an IP address or CIDR, e.g. 10.0.0.0/24") from None
    if not cidrs:
        raise ValueError("list at least one address or CIDR (default: loopback only)")
    return cidrs


@dataclass(frozen=True)
class AllowList:
    networks: tuple

    @classmethod
    def of(cls, cidrs: Iterable[str]) -> "AllowList":
        return cls(tuple(ipaddress.ip_network(c, strict=False) for c in parse_cidrs(cidrs)))

    def allows(self, host: str) -> bool:
        """True if the peer address (as getpeername gives it) is in one of the networks.
        IPv4-mapped IPv6 peers (::ffff:a.b.c.d) count as their IPv4 address."""
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False  # not an IP peer (e.g. a Unix socket): never allowed
        if address.version == 6 and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self.networks)

    def allows_peername(self, peername) -> bool:
        """For transport.get_extra_info('peername'): a (host, port, ...) tuple."""
        return isinstance(peername, tuple) and bool(peername) and self.allows(str(peername[0]))
