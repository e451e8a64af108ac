"""slurp's crypto layer: role keyring, age encryption, signing, Shamir, rotation, audit, CA.

Imports nothing else of slurp's.
"""
