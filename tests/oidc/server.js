// A real authorization server for tests/test_device_flow.py: oidc-provider with the
// device flow (RFC 8628) and its development login/consent pages, one confidential
// client, refresh tokens with offline_access. Everything comes from the environment
// the test sets; nothing here is a real secret.
//   OIDC_PORT, OIDC_CLIENT_ID, OIDC_CLIENT_SECRET
import Provider from 'oidc-provider';

const port = Number(process.env.OIDC_PORT);
const issuer = `http://127.0.0.1:${port}`;

const provider = new Provider(issuer, {
  clients: [{
    client_id: process.env.OIDC_CLIENT_ID,
    client_secret: process.env.OIDC_CLIENT_SECRET,
    grant_types: ['urn:ietf:params:oauth:grant-type:device_code', 'refresh_token'],
    response_types: [],
    redirect_uris: [],
    token_endpoint_auth_method: 'client_secret_basic',
  }],
  features: {
    deviceFlow: { enabled: true },
    devInteractions: { enabled: true },
  },
  scopes: ['openid', 'offline_access'],
  cookies: { keys: ['test-only-cookie-key'] },
  async findAccount(ctx, sub) {
    return { accountId: sub, async claims() { return { sub }; } };
  },
});
provider.proxy = false;

const server = provider.listen(port, '127.0.0.1', () => {
  console.log(`oidc-provider listening on ${issuer}`);
});
process.on('SIGTERM', () => process.exit(0));
