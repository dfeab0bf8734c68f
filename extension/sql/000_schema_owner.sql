-- First in every install and upgrade script. Postgres installs into an existing schema named pgturso without
-- looking at who owns it, and every function here runs with the installing superuser's rights: a schema that
-- another role owns or may create objects in would let that role plant functions or operators the extension
-- then calls (docs/security.md). Refuse rather than install into it.
DO $$
DECLARE
    v_schema oid := (SELECT n.oid FROM pg_namespace n WHERE n.nspname = 'pgturso');
    v_owner name;
    v_intruder text;
BEGIN
    SELECT r.rolname INTO v_owner FROM pg_namespace n JOIN pg_roles r ON r.oid = n.nspowner
    WHERE n.oid = v_schema AND NOT r.rolsuper;
    IF v_owner IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: schema pgturso is owned by %, who is not a superuser', v_owner
            USING HINT = 'Drop that schema (or check what is in it), then CREATE EXTENSION pgturso again: the '
                         'extension creates it. ALTER SCHEMA pgturso OWNER TO a superuser if you made it yourself.';
    END IF;
    SELECT coalesce(r.rolname, 'PUBLIC') INTO v_intruder
    FROM pg_namespace n CROSS JOIN LATERAL aclexplode(n.nspacl) a LEFT JOIN pg_roles r ON r.oid = a.grantee
    WHERE n.oid = v_schema AND a.privilege_type = 'CREATE' AND NOT coalesce(r.rolsuper, false)
    LIMIT 1;
    IF v_intruder IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: % may create objects in schema pgturso', v_intruder
            USING HINT = format('REVOKE CREATE ON SCHEMA pgturso FROM %s, and drop what it created there.',
                                v_intruder);
    END IF;
    SELECT x.what INTO v_intruder FROM (
        SELECT format('function %s', p.oid::regprocedure) AS what, p.proowner AS owner
        FROM pg_proc p WHERE p.pronamespace = v_schema
        UNION ALL SELECT format('operator %s', o.oid::regoperator), o.oprowner FROM pg_operator o
        WHERE o.oprnamespace = v_schema
        UNION ALL SELECT format('type %s', t.oid::regtype), t.typowner FROM pg_type t WHERE t.typnamespace = v_schema
        UNION ALL SELECT format('relation %s', c.oid::regclass), c.relowner FROM pg_class c
        WHERE c.relnamespace = v_schema) AS x
    JOIN pg_roles r ON r.oid = x.owner AND NOT r.rolsuper
    LIMIT 1;
    IF v_intruder IS NOT NULL THEN
        RAISE EXCEPTION 'pgturso: schema pgturso holds %, which a role that is not a superuser owns', v_intruder
            USING HINT = 'Drop it: only pgturso may define objects in its schema.';
    END IF;
END
$$;
