// An idlemesh wire client in JavaScript (Node >= 18), written from spec/wire.md alone:
// no dependency beyond Node's standard library. It decodes and encodes canonical
// msgpack by hand (section 3), derives peer ids (2), opens envelopes (4, 6), hashes
// tensors (5) and reads frames (7), and checks itself against the test vectors.
//
//     node spec/independent_client.mjs spec/vectors     # exit 0 when every vector passes

import { readFileSync } from "node:fs";
import { join } from "node:path";
import { createHash, createPrivateKey, createPublicKey, sign, verify } from "node:crypto";

const TYPES = ["offer", "job-request", "receipt", "receipt-ack", "statement", "dispute", "disagreements", "reputation"];
const DOMAINS = Object.fromEntries(TYPES.map((t) => [t, Buffer.from(`idlemesh/v1/${t}\0`)]));
const KIB = 1024;
const MAX_ENVELOPE = { offer: 64 * KIB, "job-request": 80 * KIB * KIB, receipt: 8 * KIB, "receipt-ack": 8 * KIB,
  statement: 8 * KIB, dispute: 8 * KIB, disagreements: 256 * KIB, reputation: 64 * KIB };
const MAX_OFFER_TTL_MS = 120000, MAX_SKEW_MS = 30000;
const ITEMSIZE = { float32: 4, float64: 8, float16: 2, int64: 8, int32: 4, int16: 2, int8: 1, uint8: 1, bool: 1 };

class Refused extends Error {
  constructor(category, why) { super(`${category}: ${why}`); this.category = category; }
}

// Values: bin -> {bin: hex}, float -> {float: x}, int -> BigInt, str, bool, null, arrays,
// maps -> plain objects (keys kept in wire order).
function decode(buf) {
  let at = 0;
  const need = (n) => { if (at + n > buf.length) throw new Refused("canonical", "truncated"); };
  const uint = (w) => { need(w); let v = 0n; for (let i = 0; i < w; i++) v = (v << 8n) | BigInt(buf[at + i]); at += w; return v; };
  const bytes = (n) => { need(n); const b = buf.subarray(at, at + n); at += n; return b; };
  function value() {
    need(1);
    const m = buf[at++];
    if (m <= 0x7f) return BigInt(m);
    if (m >= 0xe0) return BigInt(m - 256);
    if (m >= 0x80 && m <= 0x8f) return map(m & 0x0f);
    if (m >= 0x90 && m <= 0x9f) return array(m & 0x0f);
    if (m >= 0xa0 && m <= 0xbf) return bytes(m & 0x1f).toString("utf8");
    switch (m) {
      case 0xc0: return null;
      case 0xc2: return false;
      case 0xc3: return true;
      case 0xc4: return { bin: Buffer.from(bytes(Number(uint(1)))).toString("hex") };
      case 0xc5: return { bin: Buffer.from(bytes(Number(uint(2)))).toString("hex") };
      case 0xc6: return { bin: Buffer.from(bytes(Number(uint(4)))).toString("hex") };
      case 0xca: need(4); at += 4; return { float: buf.readFloatBE(at - 4) };
      case 0xcb: need(8); at += 8; return { float: buf.readDoubleBE(at - 8) };
      case 0xcc: return uint(1);
      case 0xcd: return uint(2);
      case 0xce: return uint(4);
      case 0xcf: return uint(8);
      case 0xd0: return BigInt.asIntN(8, uint(1));
      case 0xd1: return BigInt.asIntN(16, uint(2));
      case 0xd2: return BigInt.asIntN(32, uint(4));
      case 0xd3: return BigInt.asIntN(64, uint(8));
      case 0xd9: return bytes(Number(uint(1))).toString("utf8");
      case 0xda: return bytes(Number(uint(2))).toString("utf8");
      case 0xdb: return bytes(Number(uint(4))).toString("utf8");
      case 0xdc: return array(Number(uint(2)));
      case 0xdd: return array(Number(uint(4)));
      case 0xde: return map(Number(uint(2)));
      case 0xdf: return map(Number(uint(4)));
      default: throw new Refused("canonical", `marker 0x${m.toString(16)}`);
    }
  }
  function array(n) { const out = []; for (let i = 0; i < n; i++) out.push(value()); return out; }
  function map(n) {
    const out = {};
    for (let i = 0; i < n; i++) {
      const k = value();
      if (typeof k !== "string") throw new Refused("canonical", "a map key is not a str");
      if (Object.prototype.hasOwnProperty.call(out, k)) throw new Refused("canonical", "a map key repeats");
      out[k] = value();
    }
    return out;
  }
  const v = value();
  if (at !== buf.length) throw new Refused("canonical", "bytes after the value");
  return v;
}

function sized(n, fix, fixLimit, markers) {
  if (fix !== null && n < fixLimit) return Buffer.from([fix | n]);
  const widths = [1, 2, 4];
  for (let i = 0; i < 3; i++) {
    if (markers[i] !== null && n < 2 ** (8 * widths[i])) {
      const b = Buffer.alloc(1 + widths[i]);
      b[0] = markers[i];
      b.writeUIntBE(n, 1, widths[i]);
      return b;
    }
  }
  throw new Error("too long");
}

function encodeInt(v) {
  v = BigInt(v);
  if (v >= 0n && v <= 0x7fn) return Buffer.from([Number(v)]);
  if (v < 0n && v >= -32n) return Buffer.from([Number(v + 256n)]);
  const table = v >= 0n ? [[0xcc, 1], [0xcd, 2], [0xce, 4], [0xcf, 8]] : [[0xd0, 1], [0xd1, 2], [0xd2, 4], [0xd3, 8]];
  for (const [marker, w] of table) {
    const bits = BigInt(8 * w);
    if (v >= 0n ? v < 1n << bits : v >= -(1n << (bits - 1n))) {
      const b = Buffer.alloc(1 + w);
      b[0] = marker;
      let u = BigInt.asUintN(8 * w, v);
      for (let i = w; i >= 1; i--) { b[i] = Number(u & 0xffn); u >>= 8n; }
      return b;
    }
  }
  throw new Error("int out of range");
}

// Canonical encoding (section 3) of the typed values above; a plain JSON number is an int.
function encode(v) {
  if (v === null) return Buffer.from([0xc0]);
  if (v === true) return Buffer.from([0xc3]);
  if (v === false) return Buffer.from([0xc2]);
  if (typeof v === "bigint" || typeof v === "number") return encodeInt(v);
  if (typeof v === "string") { const d = Buffer.from(v, "utf8"); return Buffer.concat([sized(d.length, 0xa0, 32, [0xd9, 0xda, 0xdb]), d]); }
  if (Array.isArray(v)) return Buffer.concat([sized(v.length, 0x90, 16, [null, 0xdc, 0xdd]), ...v.map(encode)]);
  const keys = Object.keys(v);
  if (keys.length === 1 && keys[0] === "bin") { const d = Buffer.from(v.bin, "hex"); return Buffer.concat([sized(d.length, null, 0, [0xc4, 0xc5, 0xc6]), d]); }
  if (keys.length === 1 && keys[0] === "float") { const b = Buffer.alloc(9); b[0] = 0xcb; b.writeDoubleBE(v.float, 1); return b; }
  const sorted = keys.map((k) => [Buffer.from(k, "utf8"), k]).sort((a, b) => Buffer.compare(a[0], b[0]));
  return Buffer.concat([sized(sorted.length, 0x80, 16, [null, 0xde, 0xdf]), ...sorted.flatMap(([, k]) => [encode(k), encode(v[k])])]);
}

function decodeCanonical(buf) {
  const v = decode(buf);
  let again;
  try { again = encode(v); } catch (e) { throw new Refused("canonical", e.message); }
  if (!again.equals(buf)) throw new Refused("canonical", "not the canonical encoding");
  return v;
}

// Comparable form: BigInt -> decimal string, keys sorted.
function norm(v) {
  if (typeof v === "bigint" || typeof v === "number") return `int:${BigInt(v)}`;
  if (Array.isArray(v)) return v.map(norm);
  if (v && typeof v === "object" && Object.keys(v).length === 1 && "float" in v) return `float:${v.float}`;
  if (v && typeof v === "object") return Object.fromEntries(Object.keys(v).sort().map((k) => [k, norm(v[k])]));
  return v;
}
const same = (a, b) => JSON.stringify(norm(a)) === JSON.stringify(norm(b));

const B58 = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz";
function peerId(publicKey) {
  const data = Buffer.concat([Buffer.from([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]), publicKey]);
  let n = BigInt("0x" + data.toString("hex")), out = "";
  while (n > 0n) { out = B58[Number(n % 58n)] + out; n /= 58n; }
  let zeros = 0;
  while (zeros < data.length && data[zeros] === 0) zeros++;
  return "1".repeat(zeros) + out;  // base58btc writes each leading zero byte as "1"
}

const publicKeyObject = (raw) => createPublicKey({ key: { kty: "OKP", crv: "Ed25519", x: raw.toString("base64url") }, format: "jwk" });
function keyFromSeed(seed) {
  const x = createPublicKey(createPrivateKey({ key: Buffer.concat([Buffer.from("302e020100300506032b657004220420", "hex"), seed]), format: "der", type: "pkcs8" })).export({ format: "jwk" }).x;
  const priv = createPrivateKey({ key: { kty: "OKP", crv: "Ed25519", d: seed.toString("base64url"), x }, format: "jwk" });
  return { priv, pub: Buffer.from(x, "base64url") };
}

const hex = (v) => Buffer.from(v.bin, "hex");

function openEnvelope(data, type, nowMs) {
  if (data.length > MAX_ENVELOPE[type]) throw new Refused("size", `${data.length} bytes`);
  const env = decode(data);
  if (env === null || typeof env !== "object" || Array.isArray(env)) throw new Refused("field", "not a map");
  if (env.v !== 1n) throw new Refused("version", String(env.v));
  if (env.type !== type) throw new Refused("type", String(env.type));
  const signer = hex(env.signer), body = hex(env.body), sig = hex(env.sig);
  if (signer.length !== 32 || sig.length !== 64) throw new Refused("field", "signer/sig");
  if (!verify(null, Buffer.concat([DOMAINS[type], body]), publicKeyObject(signer), sig)) throw new Refused("signature", "does not verify");
  decodeCanonical(data);
  const m = decodeCanonical(body);
  if (type === "offer") {
    if (!hex(m.provider).equals(signer)) throw new Refused("field", "provider is not the signer");
    if (m.peer_id !== peerId(signer)) throw new Refused("field", "peer_id does not derive from provider");
    const issued = Number(m.issued_at_ms), expires = Number(m.expires_at_ms);
    if (expires <= nowMs || issued > nowMs + MAX_SKEW_MS || expires - issued > MAX_OFFER_TTL_MS) throw new Refused("expired", "window");
  } else if (type === "job-request" && !hex(m.buyer).equals(signer)) throw new Refused("field", "buyer is not the signer");
  else if (type === "receipt" && !hex(m.provider).equals(signer)) throw new Refused("field", "provider is not the signer");
  return m;
}

function tensorsSha256(tensors) {
  for (const t of tensors) {
    const count = t.shape.reduce((a, d) => a * Number(d), 1);
    if (hex(t.data).length !== count * ITEMSIZE[t.dtype]) throw new Refused("field", `tensor ${t.name}: data length`);
  }
  return createHash("sha256").update(encode(tensors)).digest("hex");
}

function readFrame(data, cap, expect) {
  const length = data.readUInt32BE(0);
  if (length > cap) throw new Refused("size", `${length} > ${cap}`);
  const p = decode(data.subarray(4, 4 + length));
  if (p === null || typeof p !== "object" || Array.isArray(p) || typeof p.kind !== "string") throw new Refused("field", "not a map with a kind");
  if (!expect.includes(p.kind)) throw new Refused("kind", p.kind);
  if (p.kind === "accepted") {
    if (typeof p.job_id !== "string" || !/^[0-9a-f]{32}$/.test(p.job_id)) throw new Refused("field", "job_id");
    if (typeof p.queue_position !== "bigint") throw new Refused("field", "queue_position");
  }
  return p;
}

function run(dir) {
  const load = (name) => JSON.parse(readFileSync(join(dir, name), "utf8"));
  const failures = [];
  const expect = (ok, what) => { if (!ok) failures.push(what); };
  const refusedAs = (fn) => { try { fn(); return null; } catch (e) { if (e instanceof Refused) return e.category; throw e; } };

  for (const v of load("peer_ids.json")) {
    const { pub } = keyFromSeed(Buffer.from(v.seed, "hex"));
    expect(pub.toString("hex") === v.public_key && peerId(pub) === v.peer_id, `peer id ${v.peer_id}`);
  }
  const canonical = load("canonical.json");
  for (const v of canonical.good) expect(refusedAs(() => decodeCanonical(Buffer.from(v.msgpack_hex, "hex"))) === null, `canonical refused: ${v.msgpack_hex.slice(0, 20)}`);
  for (const v of canonical.bad) expect(refusedAs(() => decodeCanonical(Buffer.from(v.msgpack_hex, "hex"))) !== null, `non-canonical accepted: ${v.name}`);
  for (const v of load("tensors.json")) {
    expect(encode(v.tensors).toString("hex") === v.msgpack_hex, "tensor encoding");
    expect(tensorsSha256(v.tensors) === v.sha256, "tensor hash");
  }
  for (const v of load("envelopes.json")) {
    const data = Buffer.from(v.envelope_hex, "hex");
    let m;
    try { m = openEnvelope(data, v.type, v.now_ms); } catch (e) { expect(false, `${v.type}: ${e.message}`); continue; }
    expect(same(m, v.body), `${v.type}: body fields`);
    expect(encode(v.body).toString("hex") === v.body_hex, `${v.type}: body encoding`);
    expect(createHash("sha256").update(Buffer.from(v.body_hex, "hex")).digest("hex") === v.body_sha256, `${v.type}: hash`);
    const { priv, pub } = keyFromSeed(Buffer.from(v.signer_seed, "hex"));
    const sig = sign(null, Buffer.concat([DOMAINS[v.type], Buffer.from(v.body_hex, "hex")]), priv);
    expect(sig.toString("hex") === v.sig, `${v.type}: signature`);
    const rebuilt = encode({ v: 1, type: v.type, signer: { bin: pub.toString("hex") }, body: { bin: v.body_hex }, sig: { bin: sig.toString("hex") } });
    expect(rebuilt.equals(data), `${v.type}: envelope encoding`);
  }
  for (const v of load("negative.json")) {
    const got = refusedAs(() => openEnvelope(Buffer.from(v.envelope_hex, "hex"), v.type, v.now_ms));
    expect(got === v.error, `${v.name}: refused as ${got}, expected ${v.error}`);
  }
  for (const v of load("frames.json")) {
    const data = Buffer.from(v.frame_hex, "hex");
    expect(data.readUInt32BE(0) === data.length - 4, `frame ${v.kind}: length`);
    expect(decode(data.subarray(4)).kind === v.kind, `frame ${v.kind}: kind`);
    expect(encode(v.payload).equals(data.subarray(4)), `frame ${v.kind}: encoding`);
  }
  for (const v of load("negative_frames.json")) {
    const got = refusedAs(() => readFrame(Buffer.from(v.frame_hex, "hex"), v.cap, v.expect));
    expect(got === v.error, `${v.name}: refused as ${got}, expected ${v.error}`);
  }
  return failures;
}

const failures = run(process.argv[2] || new URL("./vectors", import.meta.url).pathname);
for (const f of failures) console.log("FAIL", f);
console.log(JSON.stringify({ failures: failures.length }));
process.exit(failures.length ? 1 : 0);
