-- Tenant secrets, encrypted at rest (XChaCha20-Poly1305). The value never leaves the API in
-- clear except to the agent holding a run's current lease (GetAssignment.secret_env).
-- `nonce` is random per value; the AEAD's associated data is "<tenant_id>/<name>", so a
-- ciphertext copied to another row or tenant fails to decrypt. `key_id` names the configured
-- key that sealed it: old keys keep decrypting after the active key changes (rotation).
CREATE TABLE secrets (
    tenant_id   uuid NOT NULL REFERENCES tenants (id),
    name        text NOT NULL,
    key_id      text NOT NULL,
    nonce       bytea NOT NULL,
    ciphertext  bytea NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, name)
);
