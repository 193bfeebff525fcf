"""Loom's authentication: argon2id passwords, roles, JWT access tokens, rotating refresh
tokens, API tokens, login rate limiting and a Starlette backend (DESIGN §5, §11).

Pure rules (hashing, token formats, `rotate`, `LoginLimiter`) with no database: the
services pass the database in as callables. Other members import from here only.
"""

from loom_auth.api_tokens import API_TOKEN_PREFIX, ApiToken, is_api_token, new_api_token
from loom_auth.errors import (
    AuthError,
    InvalidPasswordHash,
    InvalidToken,
    NotAuthenticated,
    PasswordPolicyError,
    PermissionDenied,
    UnknownRole,
)
from loom_auth.keys import (
    missing_secret_key_message,
    require_signing_key,
    signing_key_from_secret,
)
from loom_auth.passwords import (
    MIN_PASSWORD_LENGTH,
    PasswordParams,
    check_password_policy,
    hash_password,
    needs_rehash,
    verify_dummy,
    verify_password,
)
from loom_auth.ratelimit import LoginLimiter, retry_after
from loom_auth.refresh import (
    REFRESH_TOKEN_LIFETIME,
    Outcome,
    RefreshFamilyState,
    RefreshToken,
    RefreshTokenId,
    new_family_id,
    new_refresh_token,
    parse_refresh_token,
    rotate,
)
from loom_auth.roles import Role, parse_role, role_allows, scopes_for
from loom_auth.starlette import (
    PROBLEM_JSON,
    Anonymous,
    BearerAuthBackend,
    LookupApiToken,
    LookupRole,
    Principal,
    TokenKind,
    auth_error_response,
    authorize,
    problem_response,
    requires_role,
)
from loom_auth.tokens import (
    ACCESS_TOKEN_LIFETIME,
    AccessClaims,
    AccessToken,
    decode_access_token,
    hash_token,
    new_access_token,
    token_hash_matches,
)

__all__ = [
    "ACCESS_TOKEN_LIFETIME",
    "API_TOKEN_PREFIX",
    "MIN_PASSWORD_LENGTH",
    "PROBLEM_JSON",
    "REFRESH_TOKEN_LIFETIME",
    "AccessClaims",
    "AccessToken",
    "Anonymous",
    "ApiToken",
    "AuthError",
    "BearerAuthBackend",
    "InvalidPasswordHash",
    "InvalidToken",
    "LoginLimiter",
    "LookupApiToken",
    "LookupRole",
    "NotAuthenticated",
    "Outcome",
    "PasswordParams",
    "PasswordPolicyError",
    "PermissionDenied",
    "Principal",
    "RefreshFamilyState",
    "RefreshToken",
    "RefreshTokenId",
    "Role",
    "TokenKind",
    "UnknownRole",
    "auth_error_response",
    "authorize",
    "check_password_policy",
    "decode_access_token",
    "hash_password",
    "hash_token",
    "is_api_token",
    "missing_secret_key_message",
    "needs_rehash",
    "new_access_token",
    "new_api_token",
    "new_family_id",
    "new_refresh_token",
    "parse_refresh_token",
    "parse_role",
    "problem_response",
    "require_signing_key",
    "requires_role",
    "retry_after",
    "role_allows",
    "rotate",
    "scopes_for",
    "signing_key_from_secret",
    "token_hash_matches",
    "verify_dummy",
    "verify_password",
]
