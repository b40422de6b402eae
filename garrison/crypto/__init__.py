"""Cryptography: age v1 sealing, the appliance identity and signing key, the vault's AEAD."""
