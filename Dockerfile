# syntax=docker/dockerfile:1
# One image for every node of the shop; SERVICES picks the service(s) a container runs:
#   docker run -e SERVICES=products -e TRANSPORTER=amqp://… -e MONGO_URI=mongodb://… moleculer-shop
# Debian slim rather than alpine: the `node` devDependency (Node 24 from the npm registry) and argon2's
# prebuilt binaries are glibc builds.

# --- build: the same `npm ci` and `npm run build` that CI runs, compiled to dist/
FROM node:24-bookworm-slim AS build
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --no-audit --no-fund
COPY tsconfig.json tsconfig.build.json runner.ts moleculer.config.ts ./
COPY lib lib
COPY mixins mixins
COPY services services
RUN npm run build

# --- runtime: production dependencies and compiled JavaScript only, not root
FROM node:24-bookworm-slim AS runtime
ENV NODE_ENV=production
WORKDIR /app
COPY package.json package-lock.json ./
RUN npm ci --omit=dev --no-audit --no-fund && npm cache clean --force
COPY --from=build /app/dist ./dist
COPY scripts/healthcheck.cjs ./scripts/healthcheck.cjs
# Files stay root-owned: the process cannot rewrite its own code.
USER node
ENV SERVICEDIR=dist/services PORT=3000
EXPOSE 3000
# The gateway answers /api/health; other nodes are checked on METRICS_PORT (see scripts/healthcheck.cjs).
HEALTHCHECK --interval=10s --timeout=5s --start-period=30s --retries=3 CMD ["node", "scripts/healthcheck.cjs"]
# Node itself is PID 1, not npm: SIGTERM reaches Moleculer, which stops gracefully and exits 0.
# runner.ts is moleculer-runner without its environment overrides of the config (see there).
CMD ["node", "dist/runner.js", "--config", "dist/moleculer.config.js"]
