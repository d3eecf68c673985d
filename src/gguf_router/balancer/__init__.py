"""Several gguf-router hosts behind one HAProxy, routed by model.

HAProxy does the balancing (health checks, retries, streaming, TLS, logs); this package only
writes its configuration (`gguf-router haproxy-config`) and keeps its model map current
(`gguf-router haproxy-sync`): settings.py reads balancer.conf, haproxy.py renders haproxy.cfg
and talks to HAProxy's runtime API, follow.py follows one host's model list, union.py turns the
hosts' lists into the map and the combined listing, sync.py runs it all.
"""
