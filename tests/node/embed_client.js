// A Node client of moe_embed.v1.Embedder, generated at run time from protos/ by
// @grpc/proto-loader: calls Info, Embed and EmbedStream and prints what came back as JSON.
// usage: node embed_client.js HOST:PORT '<EmbedRequest as JSON>'
"use strict";

const path = require("path");
const grpc = require("@grpc/grpc-js");
const protoLoader = require("@grpc/proto-loader");

const PROTOS = path.resolve(__dirname, "..", "..", "protos");

function loadEmbedder() {
  const definition = protoLoader.loadSync("moe_embed/v1/embedder.proto", {
    includeDirs: [PROTOS],
    keepCase: true, // field names as the .proto spells them
    enums: String,
    defaults: true,
  });
  return grpc.loadPackageDefinition(definition).moe_embed.v1.Embedder;
}

function unary(client, method, request) {
  return new Promise((resolve, reject) => {
    const deadline = new Date(Date.now() + 30000);
    client[method](request, { deadline }, (err, reply) => (err ? reject(err) : resolve(reply)));
  });
}

function stream(client, requests) {
  return new Promise((resolve, reject) => {
    const call = client.EmbedStream();
    const replies = [];
    call.on("data", (reply) => replies.push(reply));
    call.on("error", reject);
    call.on("end", () => resolve(replies));
    requests.forEach((r) => call.write(r));
    call.end();
  });
}

async function main() {
  const [target, requestJson] = process.argv.slice(2);
  const request = JSON.parse(requestJson);
  const Embedder = loadEmbedder();
  const client = new Embedder(target, grpc.credentials.createInsecure());
  try {
    const info = await unary(client, "Info", {});
    const embed = await unary(client, "Embed", request);
    const streamed = await stream(client, request.inputs.map((text, i) => (
      { ...request, id: `n${i}`, inputs: [text] })));
    let refused = null;
    try {
      await unary(client, "Embed", { inputs: request.inputs }); // no task: refused
    } catch (err) {
      refused = { code: err.code, details: err.details };
    }
    process.stdout.write(JSON.stringify({ info, embed, streamed, refused }));
  } finally {
    client.close();
  }
}

main().catch((err) => {
  process.stderr.write(`${err.stack || err}\n`);
  process.exit(1);
});
