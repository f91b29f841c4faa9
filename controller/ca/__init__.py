"""The controller's SPIFFE certificate authority (CSR validation, X.509-SVID issuance, key storage)."""

from controller.ca.authority import CertificateAuthority, IssuedCertificate
from controller.ca.csr_policy import ValidatedCsr, validate_csr
from controller.ca.errors import CaError, CaStorageError, CsrRejected

__all__ = [
    "CaError",
    "CaStorageError",
    "CertificateAuthority",
    "CsrRejected",
    "IssuedCertificate",
    "ValidatedCsr",
    "validate_csr",
]
