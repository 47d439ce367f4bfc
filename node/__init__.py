"""bidmesh: a peer-to-peer marketplace for communications services."""
