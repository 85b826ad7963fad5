"""The overlay network: IP addresses in etcd (ipam) and the VXLAN data plane (overlay)."""
