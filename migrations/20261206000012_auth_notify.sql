-- Every change to a token or a tenant (a revocation, a policy change, an edit by hand) is
-- announced on `drover_auth`, so that the APIs' token caches forget what they hold at once
-- (api/src/token_cache.rs). The notification goes out when the changing transaction commits.
CREATE FUNCTION drover_auth_changed() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('drover_auth', TG_TABLE_NAME);
    RETURN NULL;
END;
$$;

CREATE TRIGGER api_tokens_auth_changed
    AFTER UPDATE OR DELETE OR TRUNCATE ON api_tokens
    FOR EACH STATEMENT EXECUTE FUNCTION drover_auth_changed();

CREATE TRIGGER tenants_auth_changed
    AFTER UPDATE OR DELETE OR TRUNCATE ON tenants
    FOR EACH STATEMENT EXECUTE FUNCTION drover_auth_changed();
