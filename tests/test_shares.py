"""The shares of the router's connections, as pure decisions (the same through a real router:
test_hostile.py)."""

import pytest

from gguf_router.access import beyond_loopback
from gguf_router.errors import RouterError
from gguf_router.settings import Settings
from gguf_router.shares import Shares, client_of


class Connection:
    def __init__(self, key_id=None, in_reserve=False):
        self.key_id, self.in_reserve = key_id, in_reserve


def test_the_shares_follow_max_connections():
    assert Shares.of(Settings()) == Shares(total=1024, per_client=128, reserve=32, subscribers=256)
    assert Shares.of(Settings(max_connections=60)) == Shares(60, 8, 2, 15)
    assert Shares.of(Settings(max_connections=3)) == Shares(3, 3, 1, 1)
    assert Shares.of(Settings(max_connections=100, max_connections_per_client=100)).per_client == 100


def test_a_connection_is_refused_past_the_total_or_its_addresses_share():
    shares = Shares(total=10, per_client=3, reserve=2, subscribers=2)
    assert shares.refusal(["a", "a"], "a") is None
    assert "--max-connections-per-client 3" in shares.refusal(["a", "a", "a"], "a")
    assert shares.refusal(["a", "a", "a"], "b") is None
    assert shares.refusal(["a", "a", "a"], None) is None  # a unix socket has no address to share
    assert "--max-connections 10" in shares.refusal(list("abcdefghij"), "k")
    assert not shares.in_reserve(7) and shares.in_reserve(8)


def test_a_key_past_its_share_gets_429_and_the_reserve_serves_only_operators():
    shares = Shares(total=10, per_client=2, reserve=2, subscribers=2)
    open_ = [Connection("k1"), Connection("k1")]
    new = Connection()
    with pytest.raises(RouterError) as refused:
        shares.admit(new, [*open_, new], "k1", False)
    assert refused.value.status == 429 and refused.value.headers == {"Retry-After": "5"}
    shares.admit(new, [*open_, new], "k2", False)  # another key has its own share
    shares.admit(Connection(), [*open_], None, True)  # an operator is not counted
    reserve = Connection(in_reserve=True)
    with pytest.raises(RouterError) as nearly_full:
        shares.admit(reserve, [reserve], "k3", False)
    assert nearly_full.value.status == 503
    shares.admit(reserve, [reserve], None, True)


@pytest.mark.parametrize("host, beyond", [("127.0.0.1", False), ("::1", False), ("localhost", False),
                                          ("127.0.0.5", False), ("0.0.0.0", True), ("::", True), ("", True),
                                          ("192.168.1.2", True), ("llm.lan", True)])
def test_listening_beyond_loopback_is_told_apart(host, beyond):
    assert beyond_loopback(host) is beyond


def test_a_client_is_its_ipv4_address_or_its_ipv6_64():
    assert client_of("192.0.2.7") == "192.0.2.7"
    assert client_of("::ffff:192.0.2.7") == "192.0.2.7"  # the same client on a dual-stack socket
    assert client_of("2001:db8:1:2:aaaa::1") == client_of("2001:db8:1:2:ffff::9") == "2001:db8:1:2::/64"
    assert client_of("2001:db8:1:3::1") != client_of("2001:db8:1:2::1")
    assert client_of("fe80::1%eth0") == "fe80::/64"
