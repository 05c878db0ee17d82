"""One ACME order with certbot's `acme` library: account, HTTP-01 challenges, finalize.

Blocking (the library uses `requests`): the leader's AcmeManager runs it in a thread. The
challenge answers are published through callbacks that write them to the replicated
state, so every balancer answers the validator, not only the one running the order.
"""
from __future__ import annotations

import datetime
import logging
from dataclasses import dataclass
from typing import Callable

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

log = logging.getLogger(__name__)

USER_AGENT = "halb-acme"


@dataclass
class Account:
    key_pem: bytes  # EC P-256, PKCS#8 PEM: sealed with the cluster secret in the state
    uri: str = ""


@dataclass
class Issued:
    fullchain_pem: str
    key_pem: bytes
    account: Account


class AcmeError(RuntimeError):
    """An order that did not end in a certificate; the message is the reason for the event."""


def new_key_pem() -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def order_certificate(directory: str, domains: list[str], *, account: Account | None, email: str = "",
                      verify: bool | str = True, publish: Callable[[str, str], None],
                      withdraw: Callable[[list[str]], None], timeout_s: float = 120.0) -> Issued:
    """Order a certificate for `domains` (HTTP-01). `publish(token, key_authorization)` must
    return only once every node can answer the token (the write committed); `withdraw`
    takes the tokens back afterwards, also on failure."""
    # imported here: `acme` pulls in requests and pyOpenSSL, which a node without ACME
    # orders never needs (start-up time and memory of every node)
    import josepy as jose
    from acme import challenges, client, crypto_util, errors, messages

    account = account or Account(new_key_pem())
    jwk = jose.JWKEC(key=serialization.load_pem_private_key(account.key_pem, password=None))
    net = client.ClientNetwork(jwk, alg=jose.ES256, verify_ssl=verify, user_agent=USER_AGENT, timeout=30)
    tokens: list[str] = []
    try:
        acme = client.ClientV2(client.ClientV2.get_directory(directory, net), net=net)
        reg = messages.NewRegistration.from_data(email=email or None, terms_of_service_agreed=True)
        try:
            regr = acme.new_account(reg)
        except errors.ConflictError as exc:  # the account exists: its URL is in the error
            regr = messages.RegistrationResource(uri=str(exc.location), body=messages.Registration())
            net.account = regr
        account.uri = regr.uri or account.uri
        cert_key = new_key_pem()
        order = acme.new_order(crypto_util.make_csr(cert_key, domains))
        for authz in order.authorizations:
            challb = next((c for c in authz.body.challenges if isinstance(c.chall, challenges.HTTP01)), None)
            if challb is None:
                raise AcmeError(f"the CA offers no HTTP-01 challenge for {authz.body.identifier.value}")
            response, validation = challb.response_and_validation(jwk)
            token = challb.chall.encode("token")
            publish(token, validation)
            tokens.append(token)
            acme.answer_challenge(challb, response)
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=timeout_s)
        done = acme.poll_and_finalize(order, deadline)
        return Issued(fullchain_pem=done.fullchain_pem, key_pem=cert_key, account=account)
    except errors.ValidationError as exc:
        reasons = []
        for authz in exc.failed_authzrs:
            for c in authz.body.challenges:
                if c.error is not None:
                    reasons.append(f"{authz.body.identifier.value}: {c.error.detail or c.error.typ}")
        raise AcmeError("validation failed: " + ("; ".join(reasons) or str(exc))) from None
    except errors.TimeoutError:
        raise AcmeError(f"the order did not complete within {timeout_s:g}s") from None
    except (errors.Error, messages.Error) as exc:
        raise AcmeError(f"{type(exc).__name__}: {exc}"[:500]) from None
    except OSError as exc:  # requests' ConnectionError, SSLError and timeouts are OSErrors
        raise AcmeError(f"cannot reach the ACME directory {directory}: {exc}"[:500]) from None
    finally:
        if tokens:
            try:
                withdraw(tokens)
            except Exception:  # withdrawing is tidiness: an old token answers nothing useful
                log.warning("could not withdraw ACME challenge tokens; they expire on their own")


__all__ = ["Account", "AcmeError", "Issued", "new_key_pem", "order_certificate"]
